"""The training loop: DDP over the trainable parameters, AMP, gradient accumulation, resumable to the bit.

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` per rank. Gradients are synchronised by DDP
(or FSDP, `run.distributed: fsdp`) on the last micro-batch only (`no_sync()` on the others). After each step every
rank all-reduces one small vector (the model's scalars, the token count, a non-finite flag and a SIGTERM flag), so
all ranks agree on what to log, whether to skip the step and whether to stop.

Resuming restores the trainable tensors, optimizer, GradScaler, counters, the data position (skipped by index
arithmetic, see data.py) and every rank's RNG states as they were at the checkpoint, so a killed-and-resumed
run continues exactly like an uninterrupted one (bitwise on CPU).

Usage (train.py):  summary = Runner(model, dataset, collate_fn, cfg).train();  dist.cleanup()
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, IterableDataset
from tqdm import tqdm

from minigpt4.common import dist
from minigpt4.common.errors import CheckpointError
from minigpt4.common.signals import install_sigterm_handler, restore_sigterm_handler
from minigpt4.models.checkpoints import load_trainable_tensors, trainable_tensors
from minigpt4.runners import checkpointing as ckpt
from minigpt4.runners.config import RunConfig
from minigpt4.runners.data_order import EpochSlice, batches_per_pass, epoch_micro_batches
from minigpt4.runners.metrics import TIMING_FIELDS, MetricsWriter
from minigpt4.runners.nonfinite import GENERIC_ADVICE, explain_nonfinite_loss
from minigpt4.runners.optim import build_optimizer, optimizer_param_names
from minigpt4.runners.placement import fsdp_wrap, place_model
from minigpt4.runners.rng import capture_rng_state, restore_rng_state, seed_everything
from minigpt4.runners.schedules import make_lr_schedule

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
# Settings that decide which samples each micro-step reads: a checkpoint can only be continued with the same ones.
DATA_ORDER_KEYS = ("world_size", "seed", "batch_size", "grad_accum_steps", "iters_per_epoch", "shuffle")
STATE_KEYS = ("global_step", "epoch", "iter_in_epoch", "skipped_nonfinite", "consecutive_nonfinite", "optimizer",
              "rng_states", "run_facts")
STATE_FORMAT = 1


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def _scalar(name: str, value: Any, device: torch.device) -> torch.Tensor:
    t = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if t.numel() != 1:
        raise ValueError(f"model output {name!r} must be a scalar to be logged, got shape {tuple(t.shape)}")
    return t.reshape(()).float().to(device)


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the trainable tensors' bytes (the projector: a few MB, hashed in milliseconds)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Runner:
    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable | None,
        cfg: RunConfig,
        *,
        config_to_save: dict[str, Any] | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank, self.device = dist.init_distributed(cfg.device)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("run.amp: fp16 needs a GPU (loss scaling is CUDA-only here); use bf16 or none on CPU")
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        seed_everything(cfg.seed + self.rank)

        self.model = place_model(model, self.device)
        self.dataset, self.collate_fn = dataset, collate_fn
        self.config_to_save = config_to_save or {}
        self.output_dir = Path(cfg.output_dir)
        self.pin_memory = cfg.pin_memory and self.device.type == "cuda"
        self.iters_per_epoch = self._resolve_iters_per_epoch()
        self.total_steps = cfg.max_epoch * self.iters_per_epoch
        self.lr_at = make_lr_schedule(
            cfg.lr_sched, total_steps=self.total_steps, init_lr=cfg.init_lr, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_steps=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio,
        )
        self.optimizer = build_optimizer(
            self.model, lr=cfg.init_lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.adam_eps
        )
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        self.ddp: DistributedDataParallel | FullyShardedDataParallel | None = None  # the wrapper, DDP or FSDP
        if self.world_size > 1:
            # DDP's own start-up sync would broadcast the whole (frozen, multi-GB) model; the frozen parts are
            # loaded from the same files on every rank, so only the trainable tensors are broadcast.
            dist.broadcast_tensors([p.data for p in self.params])
        if self.world_size > 1 and cfg.distributed == "fsdp":
            self.ddp = fsdp_wrap(self.model, self.device)
            kept = {id(p) for p in self.model.parameters()}
            if any(id(p) not in kept for p in self.params):
                raise RuntimeError("FSDP replaced parameters the optimizer holds; it must keep them (use_orig_params)")
        elif self.world_size > 1:
            single_device = len({p.device for p in self.model.parameters()}) == 1  # not with a CPU encoder
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.local_rank] if self.device.type == "cuda" and single_device else None,
                init_sync=False,
                forward_sync_buffers=False,
                find_unused_parameters=cfg.find_unused_parameters,
                gradient_as_bucket_view=True,
            )

        self.global_step = 0  # optimizer steps done (skipped ones included: they consumed their data)
        self.epoch = 0
        self.iter_in_epoch = 0  # optimizer steps done within self.epoch
        self.skipped_nonfinite = 0
        self.consecutive_nonfinite = 0
        self.last_saved_step: int | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._prepared = False  # prepare() ran: the start point (fresh or a checkpoint) is decided and loaded
        self._preempt_requested = False
        self._step_batches: list[Any] = []  # this step's micro-batches, kept to diagnose a non-finite loss

    # ---- set-up -----------------------------------------------------------------------------------------------

    def _resolve_iters_per_epoch(self) -> int:
        cfg = self.cfg
        if isinstance(self.dataset, IterableDataset):
            if cfg.iters_per_epoch is None:
                raise ValueError("run.iters_per_epoch must be set when the training dataset is an IterableDataset")
            return cfg.iters_per_epoch
        if cfg.iters_per_epoch is not None:
            return cfg.iters_per_epoch
        size = len(self.dataset)  # type: ignore[arg-type]
        per_pass = batches_per_pass(size, cfg.batch_size, self.world_size)
        if per_pass < cfg.grad_accum_steps:
            raise ValueError(
                f"the dataset ({size} samples) gives each of {self.world_size} rank(s) {per_pass} "
                f"micro-batch(es) of {cfg.batch_size}, fewer than run.grad_accum_steps={cfg.grad_accum_steps}"
            )
        return per_pass // cfg.grad_accum_steps

    def _find_resume_checkpoint(self) -> ckpt.ResumePoint | None:
        """run.resume_ckpt_path: that checkpoint, read strictly. run.resume: the newest complete checkpoint in
        output_dir (a damaged newer one is passed over with a warning). Neither: output_dir must hold no run."""
        if self.cfg.resume_ckpt_path:
            path = ckpt.resolve_checkpoint(self.cfg.resume_ckpt_path)
            return ckpt.ResumePoint(path, *ckpt.load_checkpoint(path))
        if not self.cfg.resume:
            if ckpt.holds_checkpoints(self.output_dir):
                raise CheckpointError(
                    f"{self.output_dir} already holds checkpoints ({self.output_dir / ckpt.CHECKPOINTS}); set "
                    "run.resume: true (train.py --resume) to continue that run, or choose another run.output_dir"
                )
            return None
        found = ckpt.newest_complete_checkpoint(self.output_dir)
        if found is None:
            log.warning("run.resume is set but %s holds no checkpoint; starting from scratch", self.output_dir)
        elif found.passed_over and dist.is_main():
            log.warning("%s; resuming from %s instead, the newest complete checkpoint that run.keep_last kept",
                        "; ".join(found.passed_over), found.path)
        return found

    def _run_facts(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
            "grad_accum_steps": self.cfg.grad_accum_steps, "iters_per_epoch": self.iters_per_epoch,
            "shuffle": self.cfg.shuffle, "total_steps": self.total_steps,
        }

    def _load(self, point: ckpt.ResumePoint) -> None:
        path, tensors, state = point.path, point.tensors, point.state
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{path / ckpt.STATE_FILE} lacks {missing}: it was not written by this runner")
        saved, current = state["run_facts"], self._run_facts()
        differ = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in DATA_ORDER_KEYS
                  if saved.get(k) != current[k]]
        if differ:
            raise CheckpointError(
                f"cannot continue {path} exactly: the data order differs ({'; '.join(differ)}). Use the same "
                "settings, or start a new run initialised from its trainable.safetensors"
            )
        if saved.get("total_steps") != self.total_steps:
            log.warning("resuming %s with total_steps %s (was %s): the lr schedule changes from here",
                        path, self.total_steps, saved.get("total_steps"))
        load_trainable_tensors(self.model, tensors, path / ckpt.TRAINABLE_FILE)
        saved_names = [list(g.get("param_names", [])) for g in state["optimizer"]["param_groups"]]
        if saved_names != optimizer_param_names(self.optimizer):
            raise CheckpointError(
                f"{path / ckpt.STATE_FILE}: the optimizer state is for parameter groups {saved_names}, "
                f"but this model's are {optimizer_param_names(self.optimizer)}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.iter_in_epoch = state["iter_in_epoch"]
        self.skipped_nonfinite = state["skipped_nonfinite"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self._resume_rng = state["rng_states"][self.rank]
        self.last_saved_step = self.global_step
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, self.global_step, self.epoch,
                 self.iter_in_epoch)

    def prepare(self) -> None:
        """Decide where training starts and load that checkpoint; raises CheckpointError when this run may not
        start (an old run in output_dir without run.resume, another data order, no complete checkpoint). train()
        calls it; call it first to act only on an accepted run (train.py writes provenance.json after it)."""
        if not self._prepared:
            found = self._find_resume_checkpoint()
            if found is not None:
                self._load(found)
            self._prepared = True

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _checkpoint_path(self, step: int) -> Path:
        return self.output_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_dir_name(step)

    def _save(self) -> None:
        # Collective: every rank sends its RNG state and a fingerprint of its trainable weights, so a
        # checkpoint can never record a run whose replicas silently drifted apart.
        trainable = trainable_tensors(self.model)
        gathered = dist.all_gather_object((capture_rng_state(), tensors_fingerprint(trainable)))
        rng_states = [rng for rng, _ in gathered]
        fingerprints = [fp for _, fp in gathered]
        if len(set(fingerprints)) > 1:
            raise RuntimeError(f"trainable weights differ between ranks at step {self.global_step} "
                               f"(fingerprints {fingerprints}); DDP replicas diverged")

        def write() -> None:  # rank 0 only
            state = {
                "format": STATE_FORMAT,
                "global_step": self.global_step,
                "epoch": self.epoch,
                "iter_in_epoch": self.iter_in_epoch,
                "micro_batches_consumed": self.iter_in_epoch * self.cfg.grad_accum_steps,
                "skipped_nonfinite": self.skipped_nonfinite,
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng_states": rng_states,
                "run_facts": self._run_facts(),
            }
            path = ckpt.save_checkpoint(self.output_dir, self.global_step, trainable, state,
                                        keep_last=self.cfg.keep_last)
            log.info("saved checkpoint %s", path)

        ckpt.written_by_rank0(write, f"checkpoint step {self.global_step}")  # a failure: every rank raises it
        self.last_saved_step = self.global_step

    def _write_run_config(self) -> None:
        text = json.dumps({"run": self.cfg.to_dict(), "config": self.config_to_save}, indent=2, default=str)
        (self.output_dir / "config.json").write_text(text + "\n")

    # ---- one optimizer step -----------------------------------------------------------------------------------

    def _accumulate(self, batches: Iterator[Any]) -> tuple[dict[str, float], float, bool, bool]:
        """Forward/backward over grad_accum_steps micro-batches; returns the reduced (scalars, tokens, flags)."""
        accum = self.cfg.grad_accum_steps
        net = self.ddp if self.ddp is not None else self.model
        keys: list[str] | None = None
        sums: torch.Tensor | None = None
        tokens = 0.0
        self._step_batches = []
        for micro in range(accum):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError("the data loader ended inside an epoch; this is a bug in the sampler") from None
            self._step_batches.append(batch)
            if isinstance(batch, dict) and "num_tokens" in batch:
                tokens += float(torch.as_tensor(batch["num_tokens"]).sum())  # read on the CPU: no device sync
            batch = move_to_device(batch, self.device, non_blocking=self.pin_memory)
            sync = self.ddp is None or micro == accum - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():  # type: ignore[union-attr]
                autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    out = net(batch)
                if not isinstance(out, dict) or "loss" not in out:
                    raise KeyError(f"the model must return a dict with a 'loss' entry, got {type(out).__name__}"
                                   + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
                loss = out["loss"] / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if keys is None:
                keys = ["loss"] + sorted(k for k in out if k != "loss")
            missing = [k for k in keys if k not in out]
            if missing:
                raise KeyError(f"model output lacks {missing} on micro-batch {micro} (it had them on the first)")
            values = torch.stack([_scalar(k, out[k], self.device) for k in keys])
            sums = values / accum if sums is None else sums + values / accum
        assert keys is not None and sums is not None
        # Built on the device without reading values back: one all_reduce and one host sync per step.
        nonfinite_flag = (~torch.isfinite(sums[:1])).float()
        host_values = torch.tensor([tokens, float(self._preempt_requested)], device=self.device)
        reduced = dist.all_reduce_sum(torch.cat([sums, nonfinite_flag, host_values])).tolist()
        metrics = {k: v / self.world_size for k, v in zip(keys, reduced)}
        nonfinite, tokens_total, preempt = reduced[len(keys):]
        return metrics, tokens_total, nonfinite > 0 or not math.isfinite(metrics["loss"]), preempt > 0

    def _optimizer_step(self, lr: float, nonfinite_loss: bool) -> tuple[float | None, bool]:
        """Clip and step, or skip a step whose loss or gradients are not finite; returns (grad_norm, skipped)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm: float | None = None
        skipped = nonfinite_loss
        diagnosis = None  # a config value or the weights to blame: raises here, naming them
        if nonfinite_loss:
            diagnosis = explain_nonfinite_loss(
                self.model, self._step_batches, self.cfg, lr=lr, step=self.global_step + 1,
                steps_applied=self.global_step - self.skipped_nonfinite, amp_dtype=self.amp_dtype)
        if not skipped:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if self.cfg.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            grad_norm = float(norm)
            if self.scaler is not None:
                # fp16: inf/NaN gradients are the scaler's business (it skips the step and lowers the scale).
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                skipped = True
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:
            self.consecutive_nonfinite = 0
            return grad_norm, False
        self.skipped_nonfinite += 1
        self.consecutive_nonfinite += 1
        log.warning("step %d: non-finite loss or gradient, optimizer step skipped (%d in a row)",
                    self.global_step + 1, self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= self.cfg.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss or gradient was non-finite for {self.consecutive_nonfinite} optimizer steps in a row "
                f"(steps {self.global_step + 2 - self.consecutive_nonfinite}-{self.global_step + 1}); stopping: "
                f"{diagnosis.explain() if diagnosis is not None else GENERIC_ADVICE} "
                f"(limit: run.max_nonfinite_steps={self.cfg.max_nonfinite_steps})"
            )
        return grad_norm, True

    # ---- the loop -------------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.perf_counter()
        self.prepare()
        stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)

        writer, bar = None, None
        if dist.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temporaries(self.output_dir)
            self._write_run_config()
            writer = MetricsWriter(
                self.output_dir, resume_step=self.global_step, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                wandb_project=cfg.wandb_project, wandb_run_name=cfg.wandb_run_name,
                config={"run": cfg.to_dict(), **self.config_to_save},
            )
            if cfg.progress_bar:
                bar = tqdm(total=stop_at, initial=self.global_step, desc="train", dynamic_ncols=True)
        previous_handler = self._install_sigterm_handler()
        (self.ddp if self.ddp is not None else self.model).train()
        if self._resume_rng is not None:
            restore_rng_state(self._resume_rng)  # last, so nothing in the set-up can disturb the streams
        try:
            last_record, preempted = self._loop(stop_at, writer, bar)
        finally:
            restore_sigterm_handler(previous_handler)
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()

        completed = self.global_step >= self.total_steps
        if self.last_saved_step != self.global_step:
            self._save()
        final_dir = None
        if completed:
            final_dir = self.output_dir / ckpt.FINAL_DIR
            trainable = trainable_tensors(self.model)
            facts = {"run": cfg.to_dict(), "config": self.config_to_save, "step": self.global_step}
            ckpt.written_by_rank0(lambda: ckpt.save_final(self.output_dir, trainable, facts), "final/")
        dist.barrier()
        return {
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "completed": completed,
            "preempted": preempted,
            "skipped_nonfinite": self.skipped_nonfinite,
            "last_checkpoint": str(self._checkpoint_path(self.global_step)),
            "final_dir": str(final_dir) if final_dir is not None else None,
            "last_metrics": {k: v for k, v in last_record.items() if k not in TIMING_FIELDS},
            "elapsed_s": time.perf_counter() - started,
        }

    def _loop(self, stop_at: int, writer: MetricsWriter | None, bar: tqdm | None) -> tuple[dict[str, Any], bool]:
        cfg = self.cfg
        accum = cfg.grad_accum_steps
        samples_per_step = cfg.batch_size * accum * self.world_size
        batches: Iterator[Any] | None = None
        last_record: dict[str, Any] = {}
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
        while self.global_step < stop_at:
            if batches is None:
                part = EpochSlice(batch_size=cfg.batch_size, rank=self.rank, world_size=self.world_size,
                                  seed=cfg.seed, epoch=self.epoch, num_batches=self.iters_per_epoch * accum,
                                  start=self.iter_in_epoch * accum, shuffle=cfg.shuffle)
                batches = epoch_micro_batches(self.dataset, self.collate_fn, part, num_workers=cfg.num_workers,
                                              pin_memory=self.pin_memory)
            step_epoch = self.epoch
            metrics, tokens, nonfinite, preempt = self._accumulate(batches)
            lr = self.lr_at(self.global_step)
            grad_norm, _ = self._optimizer_step(lr, nonfinite)
            self.global_step += 1
            self.iter_in_epoch += 1
            epoch_end = self.iter_in_epoch == self.iters_per_epoch
            if epoch_end:
                self.epoch, self.iter_in_epoch = self.epoch + 1, 0
                batches = None  # the finished generator also shuts its loader's workers down
            window_steps += 1
            window_tokens += tokens

            if self.global_step % cfg.log_every == 0:
                elapsed = time.perf_counter() - window_start
                record = {"step": self.global_step, "epoch": step_epoch, "lr": lr, **metrics,
                          "grad_norm": grad_norm, "skipped_nonfinite": self.skipped_nonfinite,
                          "samples_per_s": window_steps * samples_per_step / max(elapsed, 1e-9)}
                if window_tokens:
                    record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                last_record = record
                if writer is not None:
                    writer.log(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}")
                window_start, window_steps, window_tokens = time.perf_counter(), 0, 0.0
            if bar is not None:
                bar.update(1)

            if preempt:
                log.warning("SIGTERM received: checkpointing at step %d and stopping", self.global_step)
                self._save()
                return last_record, True
            if (cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0) or \
                    (epoch_end and cfg.save_every_epoch):
                self._save()
        return last_record, False

    def _install_sigterm_handler(self) -> Any:
        """On SIGTERM (preemption) only set a flag; the loop checkpoints and returns at the next step boundary."""
        def request_stop(signum: int, frame: Any) -> None:
            self._preempt_requested = True

        return install_sigterm_handler(request_stop)
