# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · A probe chapter for the exercise machinery
#
# Not part of the book: `tests/test_student.py` builds its student edition and runs both editions.
# It follows the chapters' exercise convention (CONTRIBUTING.md, "Exercises"). An equation, so the
# page has maths: $y_t = \alpha x_t + (1 - \alpha) y_{t-1}$.

# %%
import torch

from megalodon_lite.ema import ema_recurrence
from megalodon_lite.exercises import check
from megalodon_lite.notebook import describe_run, pick_device, require_cuda, seed_everything

seed_everything(0)
device = pick_device()
describe_run(device)

# %% [markdown]
# ## Exercises
#
# **1. Predict, then run.** With $\alpha = 1$, what is $y_t$? Change `alpha` below and run.
#
# **2. Derive.** Unroll the recurrence: $y_t = \sum_{s \le t} w_{t-s} x_s$. What is $w_k$?
#
# ### BEGIN SOLUTION
# $w_k = \alpha (1 - \alpha)^k$.
# ### END SOLUTION
#
# **3. Implement the recurrence.** Write `my_ema(x, alpha)` for `x` of shape (B, L, D) and `alpha`
# of shape (D,), returning (B, L, D); the check compares it with `megalodon_lite.ema.ema_recurrence`.

# %%
def my_ema(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """y_t = alpha * x_t + (1 - alpha) * y_{t-1}, y_{-1} = 0."""
    ### BEGIN SOLUTION
    y = torch.zeros_like(x[:, 0])
    outputs = []
    for t in range(x.shape[1]):
        y = alpha * x[:, t] + (1 - alpha) * y
        outputs.append(y)
    return torch.stack(outputs, dim=1)
    ### END SOLUTION


# %% tags=["check"]
def ema_inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, channels = (int(n) for n in torch.randint(1, 9, (3,), generator=generator))
    x = torch.randn(batch, length, channels, generator=generator, dtype=torch.float64)
    alpha = torch.rand(channels, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return x, alpha


check(my_ema, reference=ema_recurrence, make_inputs=ema_inputs,
      hint="start from y = 0 and apply the recurrence once per time step")

# %% [markdown]
# ## On a GPU
#
# *The cells below need a CUDA GPU: the tests and the book build skip them on a machine without one.*

# %% tags=["gpu"]
cuda = require_cuda()
print(ema_recurrence(torch.randn(1, 4, 2, device=cuda), torch.full((2,), 0.5, device=cuda)))  # never the reader's function
