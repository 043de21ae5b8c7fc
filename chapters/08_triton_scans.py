# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Triton kernels for the scans: CEMA and TimestepNorm
#
# (Introduction: why these two ops, what their memory floor is, the plan of the chapter.
# Written by whoever finishes the chapter; both parts below fill in their own sections.)

# %%
from megalodon_lite.notebook import SMOKE, pick, pick_device, seed_everything

seed_everything(0)
device = pick_device()

# %% [markdown]
# ## Part 1 · CEMA
#
# (CEMA section: floor, blocked algorithm with a picture, kernel code in export cells tagged
# `export:ops.cema`, spec -> kernel -> check under the interpreter.)

# %% [markdown]
# ## Part 2 · TimestepNorm
#
# (TimestepNorm section: floor, block summaries and the Chan/Welford prefix, kernel code in
# export cells tagged `export:ops.timestep_norm`, closed-form backward, check under the
# interpreter.)

# %% [markdown]
# ## Part 3 · Measured on a GPU
#
# (The committed results table and figure from `kernels/bench.py`.)

# %% [markdown]
# ## Summary

# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*
