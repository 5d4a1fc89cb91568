"""torch.compile for the learning update and acting: compiled and warmed up once, checked once against the eager
functions, and given up in one line wherever it fails (the trainer then goes on with the eager ones)."""
from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm import tqdm


def compiled(functions: tuple, cuda: bool, warm_up) -> Optional[tuple]:
    """`functions` through torch.compile (on CUDA replayed as CUDA graphs), warmed up now by three calls of
    `warm_up(*compiled)` (CUDA graphs are recorded at the third), so that the loop's first calls neither compile nor
    record again. None where compiling fails: one line says why (and how to clear a damaged compile cache)."""
    mode = "reduce-overhead" if cuda else None
    functions = tuple(torch.compile(f, mode=mode) for f in functions)
    started = time.time()
    try:
        for _ in range(3):
            warm_up(*functions)
    except Exception as e:  # no C++ compiler, a GPU or PyTorch build without Triton, a damaged cache, ...
        print(f"note: torch.compile failed ({compile_failure(e)}); going on without compiling", flush=True)
        return None
    print(f"compiled the learning update and acting in {time.time() - started:.0f} s", flush=True)
    skipped = cuda_graphs_skipped()
    if skipped:  # each compiled call then runs kernel by kernel: correct, and slower
        print(f"note: CUDA graphs were not recorded for {skipped} of the compiled functions' graphs "
              "(TORCH_LOGS=perf_hints says why); the compiled calls run without them", flush=True)
    return functions


def cuda_graphs_skipped() -> int:
    """How many compiled graphs torch.compile's reduce-overhead mode ran without recording a CUDA graph."""
    from torch._dynamo.utils import counters
    return counters["inductor"].get("cudagraph_skips", 0)


class InUse:
    """The learning update's loss and acting's greedy choice in use: the compiled ones, checked once (`check`) before
    the first update, or the eager ones from the first failure on, after one line that says why."""

    def __init__(self, eager_loss, eager_greedy, compiled: Optional[tuple], greedy_when_eager=None):
        self.eager_loss, self.eager_greedy = eager_loss, eager_greedy
        self.loss_fn, self.greedy = compiled or (eager_loss, greedy_when_eager)
        self.unchecked = self.compiled = compiled is not None
        self.given_up: Optional[str] = None  # why compiling was given up, if it was

    def give_up(self, why: str) -> None:
        """One line, and the eager functions from here on (acting on every game, as the compiled one did)."""
        tqdm.write(f"note: {why}; training goes on without compiling")
        self.loss_fn, self.greedy, self.unchecked = self.eager_loss, self.eager_greedy, False
        self.given_up = self.given_up or why

    def outcome(self) -> str:
        """For the run's last line: whether compiling held, where it was on."""
        if not self.compiled:
            return ""
        return "; compiling held" if self.given_up is None else "; compiling was given up (see the note above)"

    def check(self, mismatch) -> None:
        """`mismatch(loss_fn, greedy)`: what differs between the compiled functions and the eager ones, or None."""
        self.unchecked = False
        try:
            found = mismatch(self.loss_fn, self.greedy)
        except Exception as e:
            return self.give_up(f"the compiled learning update failed its check ({compile_failure(e)})")
        if found:
            self.give_up(f"the compiled learning update or acting gives other results than the eager one: {found}")

    def failed(self, e: BaseException) -> None:
        self.give_up(f"a compiled call failed ({compile_failure(e)})")

    def greedy_actions(self, policy: torch.nn.Module, stacks: torch.Tensor) -> torch.Tensor:
        """self.greedy; where the compiled one fails, the eager one."""
        if self.greedy is not self.eager_greedy:
            try:
                return self.greedy(policy, stacks)
            except Exception as e:
                self.failed(e)
        return self.eager_greedy(policy, stacks)


def compare(compiled: tuple, eager: tuple, names: list, q: torch.Tensor, actions: torch.Tensor) -> Optional[str]:
    """What differs between a compiled learning pass and an eager one, each (loss, mean Q, gradients of the
    parameters `names`), and between compiled greedy `actions` and the argmax of the eager Q-values `q`, beyond
    float rounding (TF32 on CUDA); or None. Not the optimiser's step: AdamW is not compiled, and its first step is
    about lr * sign(gradient), which turns rounding into a large difference. Actions count only where the top two
    Q-values are not near a tie."""
    (loss_c, q_c, grads_c), (loss_e, q_e, grads_e) = compiled, eager
    found = [(f"the loss ({loss_c.item():.6g} against {loss_e.item():.6g})", loss_c, loss_e, 1e-3),
             (f"the mean Q ({q_c.item():.6g} against {q_e.item():.6g})", q_c, q_e, 1e-3)]
    found += [(f"the gradient of {name}", c, e, 2e-2) for name, c, e in zip(names, grads_c, grads_e)]
    differ = [f"{what} (relative difference {d:.2g})" for what, c, e, tolerance in found
              if not (d := relative_difference(c, e)) <= tolerance]
    top2 = q.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * q.abs().max().clamp_min(1e-6)
    wrong = int(((actions != q.argmax(1)) & clear).sum())
    if wrong:
        differ.append(f"the greedy actions of {wrong} of {len(q)} games")
    return "; ".join(differ[:3]) or None


def compile_failure(e: BaseException) -> str:
    """What a failed compile says, in one line; where the error names PyTorch's compile cache (a library cut short
    by a compile killed midway breaks every later compile), that deleting the cache lets the next run compile."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    inner = getattr(e, "inner_exception", None) or e  # torch.compile's BackendCompilerFailed wraps the error
    reason = f"{type(inner).__name__}: {(str(inner).strip().splitlines() or [''])[0][:160]}"
    text = " ".join(str(x) for x in (e, inner, e.__cause__, e.__context__) if x is not None)
    if cache_dir() in text or "file too short" in text:
        reason += f"; the compile cache may be damaged: delete {cache_dir()} and the next run compiles afresh"
    return reason


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Euclidean norms); 0 where they are equal."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if (a - b).any() else 0.0
