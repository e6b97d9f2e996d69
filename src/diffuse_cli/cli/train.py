"""`diffuse train DATA`: options -> the engine's training plan -> the training loop, drawn as it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.config import (
    PRECISIONS,
    PREDICTIONS,
    PRESETS,
    TIMESTEP_SAMPLING,
    VARIANCE_TYPES,
    WEIGHTINGS,
    DiffusionConfig,
    TrainConfig,
)
from .app import DeviceOpt, Schedule, ThreadsOpt, ZtsnrOpt, choices, console, d, duration, run

Prediction = choices("Prediction", PREDICTIONS)
Weighting = choices("Weighting", WEIGHTINGS)
VarianceType = choices("VarianceType", VARIANCE_TYPES)
TimestepSampling = choices("TimestepSampling", TIMESTEP_SAMPLING)
Precision = choices("Precision", PRECISIONS)
Preset = choices("Preset", ("auto", *PRESETS))
Classes = choices("Classes", ("auto", "none"))
_T, _D = TrainConfig(), DiffusionConfig()  # help texts read their defaults from the engine's configs


def _opt(kind, *names, help: str, **kw):
    return Annotated[kind, typer.Option(*names, help=help, **kw)]


DataArg = Annotated[
    str, typer.Argument(help="A folder of images (searched recursively) or builtin:digits.", show_default=False)
]
OutOpt = _opt(
    Path | None, "--out", "-o", help="Run folder for checkpoints, samples and logs. Default: `runs/<data name>`."
)
StepsOpt = _opt(
    int | None, "--steps", help=f"Optimizer steps to train (total, also when resuming). {d(_T.steps)}, none with --time"
)
TimeOpt = _opt(
    str | None,
    "--time",
    help="Train for this long (90s, 5m, 2h; or until --steps, whichever comes first), then save as a normal finish does.",
)
BatchOpt = _opt(
    int | None,
    "--batch-size",
    "-b",
    help="GLOBAL batch size, split over all torchrun processes. [default: 32 on a CPU, 128 on a GPU]",
)
SizeOpt = _opt(
    str | None,
    "--image-size",
    help="Resize + center-crop to this size: 32, or HxW such as 24x40 (height x width). [default: the images' own "
    "size, at most 64 on the shorter side, HxW when they share an aspect ratio; 8 for digits]",
    metavar="N|HxW",
)
ChannelsOpt = _opt(int | None, "--channels", help="1 (grayscale) or 3 (RGB). [default: from the data]")
PresetOpt = _opt(Preset, "--preset", help="Model size; auto picks by image size.")
AttnOpt = _opt(str | None, "--attention-res", help="Resolutions with self-attention, e.g. 16 or 16,8 ('' for none).")
PredictionOpt = _opt(
    Prediction | None,
    "--prediction",
    help=f"What the network predicts: eps (as in DDPM), x0 or v. {d(_D.prediction)}",
)
WeightingOpt = _opt(
    Weighting | None,
    "--loss-weighting",
    help=f"uniform (DDPM's L_simple) or min-snr (Hang et al. 2023). {d(_T.loss_weighting)}",
)
VarianceOpt = _opt(
    VarianceType | None,
    "--variance",
    help="The reverse process's variance. fixed: DDPM's (beta_t, Ho et al. 2020 sec. 3.2). learned: Improved DDPM "
    "(Nichol & Dhariwal 2021): the U-Net also outputs v, Sigma = exp(v log beta_t + (1 - v) log beta~_t) (their "
    "eq. 15), trained with L_simple + lambda L_vlb (sec. 3.1); DDPM sampling then uses it, also with few --steps, "
    f"and `diffuse eval` its bits/dim. {d(_D.variance)}",
)
VlbWeightOpt = _opt(
    float | None, "--vlb-weight", help=f"lambda of the hybrid loss (--variance learned). {d(_T.vlb_weight)}"
)
TimestepSamplingOpt = _opt(
    TimestepSampling | None,
    "--timestep-sampling",
    help="How t is drawn: uniform (DDPM), or importance: p_t ~ sqrt(E[L_t^2]) over the last 10 losses at each t "
    f"(Nichol & Dhariwal 2021 sec. 3.3; --variance learned only). {d(_T.timestep_sampling)}",
)
FlipOpt = _opt(
    bool | None,
    "--flip/--no-flip",
    help="Random horizontal flips, for pictures that mean the same mirrored (not digits or text). [default: off]",
)
AugmentOpt = _opt(
    float | None,
    "--augment",
    help="Probability of each geometric augmentation (flip, shifts, scaling, rotation, stretch), told to the "
    "network and zero when sampling so it never shows in samples (Karras et al. 2022, app. C.4); 0: off. "
    "[default: 0.12 for a folder of at most 100 images (measured to copy less and score better), else 0]",
)
ClassesOpt = _opt(
    Classes,
    "--classes",
    help="auto: learn classes from the labels (one sub-folder per class, or the digit of builtin:digits), "
    "so `diffuse sample --class` can choose; none: unconditional.",
)
CondDropOpt = _opt(
    float | None,
    "--cond-drop",
    help="With classes: how often a label is replaced by 'no class', so one network also learns the "
    f"unconditional model that guidance needs (Ho & Salimans 2022). {d(_T.cond_drop)}",
)
SampleEveryOpt = _opt(
    int | None,
    "--sample-every",
    help=f"Write a preview grid every N steps and at the end (0: never). {d(_T.sample_every)}",
)
EvalEveryOpt = _opt(
    int | None,
    "--eval-every",
    help="Score the EMA model every N steps (also at 500 and at the end): Frechet distance and KID of fixed samples "
    f"against the data, and the share that copy a training image; the best step is kept as best.safetensors "
    f"(0: never). {d(_T.eval_every)}",
)
EvalSamplesOpt = _opt(int | None, "--eval-samples", help=f"Samples per in-training evaluation. {d(_T.eval_samples)}")
MicroBatchOpt = _opt(
    int | None,
    "--micro-batch",
    help="Images per forward/backward pass on each process: the batch is split and its gradients accumulated "
    "(the same update, less memory; a setting of this machine, not kept by --resume). [default: the whole batch]",
)
CompileOpt = _opt(bool, "--compile", help="torch.compile the forward pass and loss (faster on GPU after a warm-up).")
CacheDirOpt = _opt(
    Path | None,
    "--cache-dir",
    help="Where decoded folders are cached (one uint8 file per folder, size and channels). "
    "[default: $DIFFUSE_CACHE_DIR, else ~/.cache/diffuse]",
)
NoCacheOpt = _opt(
    bool, "--no-cache", help="Decode the folder into memory in every process; read and write no cache file."
)


def train(
    data: DataArg,
    out: OutOpt = None,
    steps: StepsOpt = None,
    time: TimeOpt = None,
    batch_size: BatchOpt = None,
    lr: _opt(float | None, "--lr", help=f"AdamW learning rate. {d(_T.lr)}") = None,
    warmup: _opt(int | None, "--warmup", help=f"Linear learning-rate warmup steps. {d(_T.warmup)}") = None,
    image_size: SizeOpt = None,
    channels: ChannelsOpt = None,
    preset: PresetOpt = Preset("auto"),
    base_channels: _opt(int | None, "--base-channels", help="Width of the first U-Net level.") = None,
    channel_mults: _opt(str | None, "--channel-mults", help="Width multiplier per level, e.g. 1,2,2,2.") = None,
    num_res_blocks: _opt(int | None, "--num-res-blocks", help="Residual blocks per level.") = None,
    attention_res: AttnOpt = None,
    dropout: _opt(
        float | None,
        "--dropout",
        help="Dropout in residual blocks. [default: 0.1 for at most 100 images, else the preset's]",
    ) = None,
    kind: _opt(Schedule | None, "--kind", "-k", help=f"Beta schedule. {d(_D.schedule)}") = None,
    timesteps: _opt(int | None, "--timesteps", "-T", help=f"Diffusion steps T. {d(_D.timesteps)}") = None,
    beta_start: _opt(float | None, "--beta-start", help=d(_D.beta_start)) = None,
    beta_end: _opt(float | None, "--beta-end", help=d(_D.beta_end)) = None,
    zero_terminal_snr: ZtsnrOpt = False,
    prediction: PredictionOpt = None,
    loss_weighting: WeightingOpt = None,
    variance: VarianceOpt = None,
    vlb_weight: VlbWeightOpt = None,
    timestep_sampling: TimestepSamplingOpt = None,
    ema_decay: _opt(
        float | None, "--ema-decay", help=f"EMA decay of the weights used for samples. {d(_T.ema_decay)}"
    ) = None,
    flip: FlipOpt = None,
    augment: AugmentOpt = None,
    classes: ClassesOpt = Classes("auto"),
    cond_drop: CondDropOpt = None,
    save_every: _opt(
        int | None, "--save-every", help=f"Save a resumable state every N steps. {d(_T.save_every)}"
    ) = None,
    sample_every: SampleEveryOpt = None,
    eval_every: EvalEveryOpt = None,
    eval_samples: EvalSamplesOpt = None,
    keep: _opt(int | None, "--keep", help=f"How many periodic states to keep. {d(_T.keep)}") = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    micro_batch: MicroBatchOpt = None,
    precision: _opt(
        Precision,
        "--precision",
        help="auto = bf16 autocast on CUDA, and on a CPU where it is measured faster (runs of 200+ steps).",
    ) = Precision("auto"),
    compile: CompileOpt = False,
    seed: _opt(int | None, "--seed", help=f"Random seed (0 or more): same seed, same run. {d(_T.seed)}") = None,
    resume: _opt(bool, "--resume", help="Continue the run in --out from its newest state.") = False,
    overwrite: _opt(bool, "--overwrite", help="Start over in an --out that holds another run.") = False,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Train a U-Net to predict the noise eps in x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Each step draws images x_0, timesteps t ~ Uniform{0..T-1} and noise eps ~ N(0, I), and minimises
    ||eps - eps_theta(x_t, t)||^2 (DDPM Algorithm 1). The folder --out receives model.safetensors (EMA
    weights + config: all `diffuse sample` needs), resumable states in checkpoints/, preview grids in
    samples/, log.jsonl and config.json. Multi-GPU: launch the same command with torchrun.

    **Examples**

        diffuse train builtin:digits --out runs/digits --steps 3000

        diffuse train ~/pictures/pets --image-size 32 --out runs/pets    (pets/cat/*.jpg, pets/dog/*.jpg: 2 classes)

        diffuse train ~/pictures/faces --image-size 32 --out runs/faces --classes none

        diffuse train builtin:digits --out runs/digits --steps 6000 --resume

        diffuse train builtin:digits --out runs/digits-iddpm --variance learned    (Improved DDPM)

        torchrun --nproc_per_node 4 -m diffuse_cli train data/ --out runs/big --batch-size 256
    """
    run(_train, data, out, _options(locals()))


def _options(given: dict) -> dict:
    """The command's options as :func:`engine.plan.plan_training` takes them."""
    g = {k: v.value if hasattr(v, "value") else v for k, v in given.items()}  # choices -> their names
    pick = lambda *names, **renamed: {**{n: g[n] for n in names}, **{k: g[v] for k, v in renamed.items()}}  # noqa: E731
    return dict(
        pick("image_size", "channels", "preset", "classes", "device", "resume", "overwrite", "cache_dir"),
        cache=not g["no_cache"],
        train=pick("steps", "batch_size", "lr", "warmup", "ema_decay", "cond_drop", "save_every", "sample_every",
                   "eval_every", "eval_samples", "keep", "seed", "loss_weighting", "vlb_weight", "timestep_sampling",
                   "precision", "compile", "threads", "augment", "micro_batch", hflip="flip", time_limit="time"),
        model=pick("base_channels", "channel_mults", "num_res_blocks", "dropout", attention_resolutions="attention_res"),
        diffusion=pick("beta_start", "beta_end", "zero_terminal_snr", "prediction", "timesteps", "variance", schedule="kind"),
    )  # fmt: skip


def _train(data_spec: str, out: Path | None, options: dict) -> None:
    from ..engine import training
    from ..engine.distributed import launched_rank
    from ..engine.plan import plan_training
    from .progress import DecodeProgress, TrainProgress

    is_main = launched_rank() == 0
    say = console.print if is_main else (lambda *a, **k: None)
    with DecodeProgress(console, enabled=is_main) as decoding:
        plan = plan_training(data_spec, out, progress=decoding.advance, **options)
    say(f"[bold]data[/]  {plan.data_line}")
    for level, line in plan.notes:
        say(f"  [yellow]{line}[/]" if level else f"  {line}")
    progress = TrainProgress(plan.train, plan.diffusion, say, is_main, plan.sizing)
    try:
        result = training.train(
            plan.data, plan.out, plan.model, plan.diffusion, plan.train,
            device=options["device"], resume=plan.resume, overwrite=plan.overwrite, callback=progress.on_event,
        )  # fmt: skip
    finally:
        progress.bar.stop()
    if result["is_main"]:
        why = " (the --time budget is spent; continue with --resume)" if result.get("out_of_time") else ""
        say(
            f"[bold green]done[/] {result['step']} steps in {duration(result['elapsed'])}{why}, final loss {result['loss']:.4f}"
        )
        say(f"  model    {result['model']}")
        if any(Path(result["samples"]).glob("*.png")):  # a run under 100 steps writes none
            say(f"  previews {result['samples']}/")
        if result.get("best_step") is not None:
            say(f"  best     {result['best']} (step {result['best_step']}: the lowest Frechet distance, "
                f"{result['best_fd']:.4g}, of the in-training evaluations)")  # fmt: skip
        if result.get("report"):
            say(f"  report   {result['report']}  (diffuse report {result['out']} draws it again)")
        say(f"  next:    diffuse sample {result['model']} --num 16 --grid grid.png")
