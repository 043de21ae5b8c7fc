"""One training step of a model through ``torch.compile`` against the same step run eagerly (chapter 10).

    python kernels/check_compiled_step.py --model megalodon --context 32768 --batch 1 --backend inductor

Builds the model of ``--preset`` (``small`` by default) on the GPU, takes one batch of the default
corpus, and runs the loss and its backward under bf16 autocast: once eagerly, then ``--steps``
times through ``torch.compile(lm_loss, backend=...)`` (the trainer's ``compile`` option). Prints the
losses and the largest gradient difference relative to the largest gradient, and exits 1 when they
disagree beyond ``--rtol``. A crash inside a kernel is easiest to place with
``CUDA_LAUNCH_BLOCKING=1``; run each case in its own process, since a device fault ends the process's
CUDA context.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megalodon_lite.data import load_corpus  # noqa: E402
from megalodon_lite.train import Trainer, TrainConfig, autocast_for, lm_loss  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("megalodon", "llama"), default="megalodon")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--context", type=int, default=32_768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=2e-2, help="bf16 autocast: about two bf16 spacings")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    trainer = Trainer(TrainConfig(model=args.model, preset=args.preset, context=args.context,
                                  batch_size=args.batch, steps=100), device=device, corpus=load_corpus())
    model = trainer.model
    (inputs, targets), *_ = trainer.micro_batches(0)

    def step(fn) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast_for(device):
            loss = fn(model, inputs, targets)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.item(), [p.grad.detach().float().clone() for p in model.parameters()]

    eager_loss, eager_grads = step(lm_loss)
    compiled = torch.compile(lm_loss, backend=args.backend, dynamic=False)
    for i in range(args.steps):
        loss, grads = step(compiled)
        print(f"compiled step {i}: loss {loss:.6f} (eager {eager_loss:.6f})", flush=True)
    scale = max(g.abs().max().item() for g in eager_grads)
    worst = max((g - e).abs().max().item() for g, e in zip(grads, eager_grads)) / scale
    ok = abs(loss - eager_loss) <= args.rtol * abs(eager_loss) and worst <= args.rtol
    print(f"{args.model} context {args.context} batch {args.batch} backend {args.backend}: loss {loss:.6f} vs "
          f"eager {eager_loss:.6f}; largest gradient difference {worst:.2e} of the largest gradient "
          f"({'ok' if ok else 'DIFFERENT'}, rtol {args.rtol})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
