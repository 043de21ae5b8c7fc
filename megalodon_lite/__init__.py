"""megalodon-lite: Megalodon (Ma et al. 2024, arXiv 2404.08801) built chapter by chapter.

Most modules here are generated from the chapters in ``chapters/`` (their first line says which);
edit the chapter and run ``python -m megalodon_lite.export``. Hand-written modules:
``export`` (the generator), ``book`` (builds the executed book) and ``notebook`` (what every
chapter uses: smoke mode, device, seeding, figure saving).
"""

__version__ = "0.1.0"
