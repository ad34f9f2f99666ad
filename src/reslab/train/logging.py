"""What a run reports: TensorBoard curves and histograms, a metrics file, and a progress bar.

- TensorBoard (``<run>/tensorboard``), every curve against the optimizer step: ``loss/train`` and ``lr`` every
  ``log_every_steps`` steps (the mean loss of those steps); at each epoch's end ``loss/val``, ``accuracy/train``,
  ``accuracy/val``, ``images_per_second``, ``weights/<param>`` histograms and ``grad_norm/<param>`` (mean over
  the epoch's steps); ``inputs/train``, a grid of augmented training images.
- ``<run>/metrics.jsonl``: one JSON object per epoch, for people who don't run TensorBoard.
- ``<run>/grad_norms.jsonl``: per epoch, ``{"epoch": e, "norms": {parameter: mean gradient L2 norm}}``.
- A rich progress bar with ETA, images/s and loss; ``quiet`` prints one line per epoch instead.
Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        quiet: bool,
        hist_every: int,
        history: list[dict],
        grad_norms: list[dict],
        start_step: int = 0,
    ) -> None:
        """``history``, ``grad_norms`` and ``start_step`` (the global step) come from the checkpoint a run resumes
        (empty and 0 for a new run): the two JSON-lines files are rewritten from them and TensorBoard drops any
        event logged after it, so steps run after the checkpoint and before a kill are not counted twice."""
        self.enabled, self.quiet, self.hist_every = enabled, quiet, hist_every
        self.console = Console(highlight=False, soft_wrap=True)
        self.writer = None
        self.metrics_path = run_dir / "metrics.jsonl"
        self.grad_norms_path = run_dir / "grad_norms.jsonl"
        self.progress: Progress | None = None
        self._task = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step or None)
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
            self.grad_norms_path.write_text("".join(json.dumps(r) + "\n" for r in grad_norms))

    # --- progress ----------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        """A progress bar over ``steps`` steps, ``done`` of them already (an epoch resumed mid-way)."""
        self._epoch_start = time.perf_counter()
        if not self.enabled or self.quiet:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[speed]} img/s  loss {task.fields[loss]}"),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self._task = self.progress.add_task("train", total=steps, completed=done, speed="-", loss="-")

    def step(self, images_seen: int, loss: float | None, steps: int = 1) -> None:
        """``steps`` more steps done, ``images_seen`` images this epoch so far, the last step's ``loss``."""
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._epoch_start
        fields = {"speed": f"{images_seen / max(elapsed, 1e-9):.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        self.progress.update(self._task, advance=steps, **fields)

    def end_epoch(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    # --- records -----------------------------------------------------------------------------------------
    def log_step(self, global_step: int, loss: float, lr: float) -> None:
        """The mean training loss of the last ``log_every_steps`` steps, and the learning rate."""
        if self.enabled:
            self.writer.add_scalar("loss/train", loss, global_step)
            self.writer.add_scalar("lr", lr, global_step)

    def log_epoch(self, record: dict, global_step: int) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, tag in (
            ("val_loss", "loss/val"),
            ("train_acc", "accuracy/train"),
            ("val_acc", "accuracy/val"),
            ("images_per_second", "images_per_second"),
        ):
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step)

    def log_model(self, model: nn.Module, grad_norms: dict, global_step: int) -> None:
        """``grad_norms``: one epoch's ``{"epoch": e, "norms": {parameter: mean gradient L2 norm}}``."""
        if not self.enabled:
            return
        epoch = grad_norms["epoch"]
        with self.grad_norms_path.open("a") as f:
            f.write(json.dumps(grad_norms) + "\n")
        for name, value in grad_norms["norms"].items():
            self.writer.add_scalar(f"grad_norm/{name}", value, global_step)
        if self.hist_every and epoch % self.hist_every == 0:
            for name, p in model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), global_step)

    def log_images(self, images: Tensor, mean: Tensor, std: Tensor, global_step: int) -> None:
        """A grid of (up to 64) normalized training images (B, C, H, W), shown as the model sees them."""
        if not self.enabled:
            return
        from torchvision.utils import make_grid

        x = images[:64].detach().float().cpu() * std.cpu()[:, None, None] + mean.cpu()[:, None, None]
        self.writer.add_image("inputs/train", make_grid(x.clamp(0, 1), nrow=8), global_step)

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()


class GradNormTracker:
    """Per-parameter gradient L2 norms averaged over an epoch's steps (one fused foreach call per step)."""

    def __init__(self, model: nn.Module) -> None:
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        self.total: Tensor | None = None
        self.steps = 0
        self._where: dict[tuple[int, ...], Tensor] = {}  # indices of the parameters that have gradients

    def norms(self) -> Tensor | None:
        """Every parameter's gradient L2 norm now, (num_params,), 0 for a parameter without a gradient (frozen
        while fine-tuning the head); None before the first backward pass."""
        grads = [p.grad for p in self.params]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return None
        norms = torch.stack(torch._foreach_norm([grads[i] for i in present])).float()
        if len(present) == len(grads):
            return norms
        key = tuple(present)
        if key not in self._where:  # once per frozen set: a host-to-device copy at every step would wait
            self._where[key] = torch.tensor(present, device=norms.device)
        return torch.zeros(len(grads), device=norms.device).index_copy(0, self._where[key], norms)

    def add(self, norms: Tensor) -> None:
        """One step's norms, counted only where all are finite (fp16's loss scaler skips the other steps). On
        the device: no host synchronization."""
        finite = torch.isfinite(norms).all()
        norms = torch.where(finite, norms, torch.zeros_like(norms))
        self.total = norms if self.total is None else self.total + norms
        self.steps = self.steps + finite.long()

    def state_dict(self) -> dict:
        return {"total": None if self.total is None else self.total.cpu(), "steps": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        total = state["total"]
        self.total = None if total is None else total.to(self.params[0].device)
        self.steps = state["steps"]

    def pop(self) -> dict[str, float]:
        if self.total is None:
            return {}
        means = (self.total / max(int(self.steps), 1)).tolist()
        self.total, self.steps = None, 0
        return dict(zip(self.names, means, strict=True))
