"""The training session of ``dharma train``: a manifest, its data and a run directory turned into a
finished run. :func:`~dharma_kernel.train.run.train` starts it (or, for ``[finetune]``, its
subclass :class:`~dharma_kernel.train.finetune.FinetuneSession`).

Setup (data, tokenizer, model, optimizer, resume) then the loop: step, log, evaluate
every ``eval_every`` steps, checkpoint every ``save_every``, and on a stop request
(Ctrl-C, SIGTERM) save and return. Only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ..errors import DharmaError
from ..manifest import Manifest
from .compiled import check_compile, for_training
from .distributed import Dist, is_sharded, wrap
from .flat import for_compiled_training
from .heap import keep_freed_memory
from .loop import Loop, Progress, check_finite_weights
from .precision import LossScale, resolve_precision
from .progress import Reporter
from .rundir import RunDir
from .stacked import for_eager_training
from .state import capture_rng, load_state, restore_rng, save_state
from .windows import Windows

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    """What the command line may change on top of the manifest."""

    data: list[str] | None = None
    output: str | None = None
    resume: bool = False
    reset_optimizer: bool = False
    run_modules: bool = False  # with resume: the run's own modules, whatever `all` resolves to now
    max_steps: int | None = None
    freeze: list[str] = field(default_factory=list)
    strict: bool | None = None
    device: str | None = None


@dataclass
class Summary:
    steps: int
    tokens: int
    skipped: int
    first_eval_ppl: float | None
    best_eval_ppl: float | None
    best_step: int | None
    output: Path
    interrupted: bool
    latest: Path | None
    best: Path | None
    application: Path | None = None  # fine-tuning: the application (or merged model) written
    selected: str | None = None  # fine-tuning: which checkpoint became the application, and why
    first_eval: dict[str, float] = field(default_factory=dict)  # fine-tuning with a head: eval metrics
    best_eval: dict[str, float] = field(default_factory=dict)


class _Session:
    def __init__(
        self,
        manifest: Manifest,
        options: TrainOptions,
        dist: Dist,
        device: torch.device,
        console: Console,
    ) -> None:
        self.options, self.dist, self.device, self.console = options, dist, device, console
        self.manifest, self.cfg = manifest, manifest.train
        if options.run_modules:
            self.manifest = self._with_run_modules(manifest)
        self.plan = self._plan()
        self.run_dir = RunDir(self._run_root())
        self.precision = resolve_precision(self.cfg.precision, device)
        check_compile(self.cfg, dist)

    def _plan(self) -> Any:
        from ..assemble import plan
        from ..manifest import check_requires

        check_requires(self.manifest)
        return plan(self.manifest)

    def _with_run_modules(self, manifest: Manifest) -> Manifest:
        """The manifest with ``include`` set to the modules the run to resume was trained with."""
        from ..module_set import saved_refs

        latest = RunDir(self._run_root()).link("latest")
        refs = saved_refs(latest) if latest is not None else None
        if refs is None:
            raise DharmaError(
                f"--run-modules: {self._run_root()} holds no checkpoint to take the modules from",
                hint="Use --run-modules with --resume on a run that saved a checkpoint.",
            )
        modules = manifest.modules.model_copy(update={"include": refs, "exclude": []})
        return manifest.model_copy(update={"modules": modules})

    def _run_root(self) -> Path:
        output = self.options.output or self.manifest.resolve_path(self.cfg.output)
        return Path(output).resolve()

    def open_run_dir(self) -> None:
        """Refuse a resume without a checkpoint and a new run over an old one; on the main process
        (holding the run's lock), remove what a kill while saving left."""
        latest = self.run_dir.link("latest")
        if self.options.resume and latest is None:
            raise DharmaError(
                f"--resume: {self.run_dir.root} holds no checkpoint to resume from",
                hint="Run without --resume to start training, or give the run's --output.",
            )
        found = self.run_dir.holds()
        if not self.options.resume and found is not None:
            raise DharmaError(
                f"{self.run_dir.root} already holds a training run ({found})",
                hint="Pass --resume to continue it, or --output DIR to start a new run elsewhere "
                "(or remove that directory to start over).",
            )
        if self.dist.main:
            self.run_dir.clean_staging()

    # -- setup -------------------------------------------------------------------------

    def run(self) -> Summary:
        from ..assemble import build
        from ..freeze import freeze_groups
        from .optim import build_optimizer

        latest = self.run_dir.link("latest") if self.options.resume else None
        state = load_state(latest) if latest is not None else None
        self.tokenizer, train_data, eval_data, report = self._data(latest)
        if self.dist.main:
            self.console.print(report.summary())
            if report.problems:
                log.warning(report.problems_summary())

        groups = list(dict.fromkeys([*self.manifest.freeze.groups, *self.options.freeze]))
        self.plan.config.manifest["freeze"] = {"groups": groups}
        model = self._model(latest, build)
        _use_special_tokens(model, self.tokenizer)
        freeze_groups(model, groups)
        model.to(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.set_module_checkpointing(True)

        windows = Windows(len(train_data), self.cfg.batch_size, self.cfg.grad_accum,
                          self.dist.world, self.dist.rank, self.cfg.seed)  # fmt: skip
        total = self._total_steps(windows)
        wrapped = wrap(model, self.dist, self.device, self.cfg.distributed)
        # train.compile: modules trained as flat tensors (not when resuming unequal step counts)
        saved = (state or {}).get("optimizer") if not self.options.reset_optimizer else None
        flat = stacked = None
        try:  # from here on, whatever fails gives the model's parameters their own storage back
            flat = for_compiled_training(model, self.cfg, saved)
            # eagerly, on the grouped path: the groups' parameters held stacked (train.stacked)
            stacked = for_eager_training(model, self.cfg, self.device, self.dist.enabled)
            optimizer = build_optimizer(model, self.cfg, total, self.device, flat, stacked)  # after sharding
            loop = Loop(
                model=for_training(wrapped, self.cfg, flat),
                raw=model,
                optimizer=optimizer,
                train_data=train_data,
                eval_data=eval_data,
                windows=windows,
                dist=self.dist,
                device=self.device,
                precision=self.precision,
                lm_weight=self.manifest.loss.lm,
                max_grad_norm=self.cfg.max_grad_norm,
                scale=LossScale(enabled=self.precision == "fp16"),
            )
            if state is not None:
                self._restore(loop, state, model)
            elif self.dist.main:
                self.run_dir.root.mkdir(parents=True, exist_ok=True)
                self.run_dir.metrics.unlink(missing_ok=True)
                (self.run_dir.root / "manifest.json").write_text(
                    json.dumps(self.manifest.to_dict(), indent=2)
                )
            return self._loop(loop, total)
        finally:
            for held in (flat, stacked):
                if held is not None:
                    held.release()  # the model's parameters own their storage again

    def _total_steps(self, windows: Windows) -> int:
        return self.options.max_steps or self.cfg.max_steps or self.cfg.epochs * windows.steps_per_epoch

    def _data(self, latest: Path | None) -> tuple:
        """The tokenizer and the prepared data (see :mod:`dharma_kernel.data.cache`): the main
        process prepares it when the cache has no match, the others then open it."""
        from ..checkpoint import load_saved_tokenizer
        from ..data.cache import prepared_data
        from .eval_rows import eval_rows

        # A resumed run keeps its vocabulary.
        given = load_saved_tokenizer(latest) if latest is not None else None
        refs = [spec["ref"] for spec in self.plan.config.layout["modules"]]
        options, config = self.options, self.plan.config.text_config
        data = None
        if self.dist.main:
            data = prepared_data(
                self.manifest, options.data, options.strict, refs, config, given, self.console
            )
        self.dist.barrier()
        if data is None:
            data = prepared_data(self.manifest, options.data, options.strict, refs, config, given,
                                 prepare_here=False)  # fmt: skip
        held_out = eval_rows(data.eval, self.cfg.eval_tokens, self.manifest.data.max_length, self.cfg.seed)
        return data.tokenizer, data.train, held_out, data.report

    def _model(self, latest: Path | None, build: Any) -> Any:
        if latest is None:
            return build(self.plan, seed=self.cfg.seed)
        from ..model import DharmaModel

        model = DharmaModel.from_pretrained(latest)  # aligned copies: resume steps bit-exactly
        saved, now = model.module_refs, [spec["ref"] for spec in self.plan.config.layout["modules"]]
        if saved != now and set(saved) != set(now):
            from ..module_set import resume_refusal

            raise resume_refusal(latest, saved, now, self.manifest.to_dict().get("modules", {}))
        if model.config.layout != self.plan.config.layout:
            raise DharmaError(
                f"{latest} was trained with a different model layout than the manifest now describes",
                hint="Resume with the manifest the run started from, or start a new run with --output.",
            )
        return model

    def _restore(self, loop: Loop, state: dict[str, Any], model: Any) -> None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if names != state["trainable"] and not self.options.reset_optimizer:
            raise DharmaError(
                f"the trainable parameters differ from the checkpoint's ({len(names)} now, "
                f"{len(state['trainable'])} then): the freeze groups changed",
                hint="Pass --reset-optimizer to resume with fresh optimizer state, "
                "or use the run's freeze groups.",
            )
        if not self.options.reset_optimizer:
            loop.optimizer.load_state_dict(state["optimizer"])
        else:
            for _ in range(state["progress"]["step"]):
                loop.optimizer.schedule_step()  # keep the learning rate where the run was
        self._say_schedule_change(loop.optimizer, state)
        loop.scale.load_state_dict(state["scale"])
        loop.progress = Progress(**state["progress"])
        restore_rng(state["rng"])
        if self.dist.main:
            self.run_dir.truncate_metrics(loop.progress.step)

    def _say_schedule_change(self, optimizer: Any, state: dict[str, Any]) -> None:
        """A resume that runs to another total re-plans the schedule over the new total: say so, with
        the learning rate the run had and the one it goes on with."""
        from .optim import lr_factor

        before, now, step = state.get("total_steps"), optimizer.total_steps, state["progress"]["step"]
        step = (state.get("optimizer") or {}).get("schedule_step", step)  # skipped steps count too
        if before is None or before == now or not self.dist.main:
            return
        cfg = self.cfg

        def lr(total: int) -> float:
            return cfg.learning_rate * lr_factor(cfg.schedule, step, total, cfg.warmup_fraction)

        log.warning(
            f"the run's {cfg.schedule} schedule spanned {before} steps; resuming to {now} re-plans it over "
            f"{now}: step {step + 1} trains at learning rate {lr(now):.3g} ({lr(before):.3g} on the old "
            f"schedule), then the rate follows the {now}-step schedule"
        )

    # -- the loop ----------------------------------------------------------------------

    def _loop(self, loop: Loop, total: int) -> Summary:
        cfg = self.cfg
        save_every = cfg.save_every or cfg.eval_every
        reporter = Reporter(self.run_dir, self.console, total, loop.progress.step, cfg.log_every,
                            cfg.tensorboard, self.dist.main)  # fmt: skip
        with loop.interrupts():
            try:
                if loop.progress.step == 0 and loop.eval_data is not None:
                    self._evaluate(loop, reporter)
                while loop.progress.step < total and not loop.stop_requested:
                    result = loop.train_step()
                    step = loop.progress.step
                    reporter.step(step, result.metrics)
                    if not result.finite and loop.progress.consecutive_skips >= cfg.max_nonfinite:
                        self._too_many_skips(loop)
                    improved = False
                    if loop.eval_data is not None and (step % cfg.eval_every == 0 or step == total):
                        improved = self._evaluate(loop, reporter)
                    if step % save_every == 0 or step == total or improved:
                        self._save(loop, reporter)
                    if step < total and self._stop_early(loop):
                        break
                if loop.stop_requested and self.run_dir.link("latest") != self.run_dir.step_dir(
                    loop.progress.step
                ):
                    self._save(loop, reporter)
            finally:
                reporter.close()
        return self._summary(loop)

    def _evaluate(self, loop: Loop, reporter: Reporter) -> bool:
        metrics = self._eval_metrics(loop)
        progress = loop.progress
        if progress.first_eval is None:
            progress.first_eval = metrics["eval_loss"]
        progress.last_eval = metrics["eval_loss"]
        reporter.eval(progress.step, metrics)
        if progress.step > 0 and self._improves(metrics, progress):
            progress.best_eval, progress.best_step = metrics["eval_loss"], progress.step
            return True
        return False

    def _improves(self, metrics: dict[str, Any], progress: Progress) -> bool:
        """Whether this evaluation's checkpoint becomes ``best``: here, a lower eval loss."""
        return metrics["eval_loss"] < progress.best_eval

    def _stop_early(self, loop: Loop) -> bool:
        """Whether to end the run before its last step (fine-tuning's patience); here, never."""
        return False

    def _eval_metrics(self, loop: Loop) -> dict[str, Any]:
        return loop.evaluate(self.cfg.batch_size)

    def _save(self, loop: Loop, reporter: Reporter) -> None:
        from ..checkpoint import save

        step = loop.progress.step
        if not _sound(loop.progress):
            # The weights gave a non-finite evaluation: such a checkpoint would become `latest`
            # and be named "the last good checkpoint". Every process returns, so none waits in a barrier.
            if self.dist.main:
                warnings.warn(
                    f"not saving step {step}: its evaluation loss is not finite; "
                    f"latest stays {self.run_dir.link('latest') or 'unset'}",
                    stacklevel=2,
                )
            return
        sharded = is_sharded(loop.raw)
        # Sharded, every process takes part in gathering the weights and optimizer state.
        weights = _full_state_dict(loop.raw) if sharded else None
        optimizer = loop.optimizer.state_dict() if sharded or self.dist.main else None
        if self.dist.main:
            check_finite_weights(loop.raw, weights)
            state = {
                "progress": asdict(loop.progress),
                "optimizer": optimizer,
                "scale": loop.scale.state_dict(),
                "rng": capture_rng(),
                "trainable": [n for n, p in loop.raw.named_parameters() if p.requires_grad],
                "world": self.dist.world,
                "total_steps": loop.optimizer.total_steps,  # what the schedule spans
            }
            target = save(loop.raw, self.run_dir.step_dir(step), self.tokenizer,
                          extra=lambda d: save_state(d, state), state_dict=weights)  # fmt: skip
            self.run_dir.point("latest", target)
            if loop.progress.best_step == step:
                self.run_dir.point("best", target)
            self.run_dir.prune(self.cfg.keep_last)
            reporter.saved(target)
        self.dist.barrier()

    def _too_many_skips(self, loop: Loop) -> None:
        latest = self.run_dir.link("latest")
        where = f"the last good checkpoint is {latest}" if latest else "no good checkpoint was saved"
        raise DharmaError(
            f"the loss or gradients were not finite for {loop.progress.consecutive_skips} steps in a row "
            f"(up to step {loop.progress.step}); stopped. {where}",
            hint='Lower train.learning_rate, or use precision = "fp32", then resume or start again.',
        )

    def _summary(self, loop: Loop) -> Summary:
        p = loop.progress
        from ..evaluate import perplexity

        def ppl(loss: float | None) -> float | None:
            return perplexity(loss) if loss is not None else None

        return Summary(
            steps=p.step,
            tokens=p.tokens,
            skipped=p.skipped,
            first_eval_ppl=ppl(p.first_eval),
            best_eval_ppl=ppl(p.best_eval if p.best_step is not None else None),
            best_step=p.best_step,
            output=self.run_dir.root,
            interrupted=loop.stop_requested,
            latest=self.run_dir.link("latest"),
            best=self.run_dir.link("best"),
        )


def _sound(progress: Progress) -> bool:
    """Whether the last evaluation (if any) of the current weights was finite."""
    return progress.last_eval is None or math.isfinite(progress.last_eval)


def _use_special_tokens(model: Any, tokenizer: Any) -> None:
    """The tokenizer's end/start/pad ids in the saved config, so generation stops where text ends.

    A fresh GPT-2 config says EOS is its last vocabulary id; a BPE trained here puts it at 0.
    """
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if name == "pad_token_id" and value is None:
            value = tokenizer.eos_token_id
        if value is None:
            continue
        setattr(model.config.text_config, name, value)
        setattr(model.generation_config, name, value)


def _full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict on the main process, in CPU memory (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Gathered copies no longer share storage, so save_pretrained would keep both names of a tied
    # weight (the output embedding): keep each parameter under the one name the model lists it by.
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in weights.items() if name in kept}
