"""Progress drawing: the decode bar, the training bar and its lines, a counting bar for sampling."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..engine.config import UNLIMITED_STEPS
from .app import console, duration


class DecodeProgress:
    """A transient bar while a folder is decoded (nothing for data that needs no decoding)."""

    def __init__(self, con, enabled: bool = True):
        columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self.bar = Progress(TextColumn("[bold]decode[/]"), *columns, console=con, disable=not enabled, transient=True)
        self.task = None

    def __enter__(self) -> DecodeProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("decode", total=None)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)


class CountingProgress:
    """A bar that counts images and shows their rate: ``with CountingProgress("sample", n) as p: p.advance(k)``."""

    def __init__(self, label: str, total: int, con=console):
        self.bar = Progress(
            TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), console=con,
        )  # fmt: skip
        self.total, self.label, self.t0 = total, label, time.perf_counter()

    def __enter__(self) -> CountingProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=self.total, ips="…")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, done: int) -> None:
        self.bar.update(self.task, completed=done, ips=f"{done / (time.perf_counter() - self.t0):.1f}")


class TrainProgress:
    """Draws the training events: a header, a progress bar (plain lines every ~10% off a terminal), notes.

    With --time the bar measures the time budget, not steps."""

    def __init__(self, cfg, diff_cfg, say, is_main: bool, sizing: str = ""):
        self.cfg, self.diff_cfg, self.say, self.is_main, self.sizing = cfg, diff_cfg, say, is_main, sizing
        self.timed = cfg.time_limit is not None
        count = TextColumn("step {task.fields[step]}") if self.timed else MofNCompleteColumn()
        self.bar = Progress(
            TextColumn("[bold]train[/]"), BarColumn(), count, TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[ips]} img/s, data {task.fields[data]}"), TextColumn("{task.fields[fd]}"),
            TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console, disable=not is_main, transient=False,
        )  # fmt: skip
        self.task, self.estimated, self.last_plain = None, False, -1

    def on_event(self, e: dict) -> None:
        handler = getattr(self, f"_on_{e['event']}", None)
        if handler is not None:
            handler(e)

    def _on_start(self, e: dict) -> None:
        cfg, say = self.cfg, self.say
        threads = f", {e['threads']} CPU threads" if e["device"] == "cpu" else ""
        sized = f", {self.sizing}" if self.sizing else ""
        precision = e["precision"].replace("bfloat16", "bf16")
        why = f" ({e['precision_note']})" if e.get("precision_note") else ""
        say(f"[bold]model[/] U-Net {e['parameters'] / 1e6:.2f}M parameters{sized}")
        say(
            f"      device {e['device']}{threads}, precision {precision}{why}, {e['world_size']} process(es), "
            f"global batch {cfg.batch_size}"
        )
        if self.diff_cfg is not None:
            dc = self.diff_cfg
            say(f"[bold]noise[/] {dc.schedule} schedule, T = {dc.timesteps}, predicting {dc.prediction}")
        if e["resumed"]:
            say(f"resuming at step {e['step']}")
        if self.timed:
            either = "" if cfg.steps >= UNLIMITED_STEPS else f" or {cfg.steps} steps, whichever comes first"
            say(f"[bold]time[/]  training for {duration(cfg.time_limit)}{either}")
        say(f"[dim]loss = mean of ||target - prediction||^2 over the last {cfg.log_every} steps (as in log.jsonl)[/]")
        total, done = (cfg.time_limit, 0) if self.timed else (e["steps"], e["step"])
        say(f"[bold]data[/]  {e['data']}")
        self.task = self.bar.add_task("train", total=total, completed=done, loss="…", ips="…", step=e["step"], data="…",
                                      fd="")  # fmt: skip
        self.bar.start()

    def _on_step(self, e: dict) -> None:
        done = min(e["elapsed"], self.cfg.time_limit) if self.timed else e["step"]
        self.bar.update(self.task, completed=done, step=e["step"])

    def _on_log(self, e: dict) -> None:
        cfg = self.cfg
        data_share = f"{e['data_ms'] / max(e['step_ms'], 1e-9):.0%} of {e['step_ms']:.0f} ms/step"
        self.bar.update(self.task, loss=f"{e['loss']:.4f}", ips=f"{e['img_per_s']:.0f}", data=data_share)
        if not self.estimated and e["step"] < cfg.steps:  # the first measured speed: say what the run will cost
            self.estimated = True
            per_1000 = 1000 * cfg.batch_size / max(e["img_per_s"], 1e-9)
            left = cfg.steps - e["step"]
            rest = "" if self.timed else f"; the remaining {left} take ~{duration(per_1000 * left / 1000)}"
            self.bar.console.print(f"  ~{e['img_per_s']:.0f} img/s: 1,000 steps take ~{duration(per_1000)}{rest}")
        if not console.is_terminal and self.is_main:  # logs and CI: a plain line every ~10%
            tenth = int(e["elapsed"] * 10 / cfg.time_limit) if self.timed else e["step"] * 10 // cfg.steps
            if tenth != self.last_plain:
                self.last_plain = tenth
                of = "" if self.timed else f"/{cfg.steps}"
                self.say(
                    f"  step {e['step']}{of}  loss {e['loss']:.4f}  {e['img_per_s']:.0f} img/s  data {data_share}  "
                    f"{e['elapsed']:.0f}s"
                )

    def _on_threads(self, e: dict) -> None:
        if self.is_main:
            self.bar.console.print(f"  step {e['step']}: the machine's load changed; now {e['threads']} CPU threads")

    def _on_warning(self, e: dict) -> None:
        self.bar.console.print(f"[yellow]warning:[/] {e['message']}")

    def _on_eval(self, e: dict) -> None:
        """The in-training evaluation (engine/monitor.py): on the bar, and as a line of its own."""
        self.bar.update(self.task, fd=f"FD {e['fd']:.3g} (floor {e['fd_floor']:.2g})")
        best = " [green]best so far[/]" if e["best"] else f" (best: step {e['best_step']})"
        self.bar.console.print(
            f"  step {e['step']}: FD {e['fd']:.4g} (real vs real at {e['eval_samples']}: {e['fd_floor']:.2g}), "
            f"KID {e['kid']:.3g}, near-copies {e['near_copy']:.0%} (real images {e['near_copy_ref']:.0%}), "
            f"{e['eval_s']:.0f} s{best}"
        )

    def _on_preview(self, e: dict) -> None:
        self.bar.console.print(f"  step {e['step']}: samples -> {e['path']}")
