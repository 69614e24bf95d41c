"""The policy being trained, with everything an update needs, loaded once: the model under
accelerate, the frozen reference, the optimizer and its state. `rl3d rl-step` makes one, applies
one update and writes a checkpoint; `rl3d train` keeps one for many steps.

An update, top to bottom: advantages per level and group -> the samples that train -> reference
log-probs -> (recomputed old log-probs, with the truncated importance weights of stale samples) ->
epochs x minibatches of optimizer steps -> metrics."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import Progress
from rl3d.stages.policy.checkpoint import VISION_MODULES, freeze_vision, load_optimizer_state, load_policy
from rl3d.stages.policy.device import no_cudnn_attention, resolve_device_dtype
from rl3d.stages.policy.sampler import CompletionLogprobs
from rl3d.stages.policy.sequence import LEVELS
from rl3d.stages.rl import master_weights, processes
from rl3d.stages.rl.advantages import compute_advantages
from rl3d.stages.rl.micro_batch import AUTO, auto_rows, needs_checkpointing
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.inputs import learned_nothing
from rl3d.stages.rl.loss import diagnostics, mismatch_metrics
from rl3d.stages.rl.update import (UpdateStats, recompute_old_logprobs, reference_logprobs,
                                   run_updates, tis_metrics)

# per-phase seconds in the metrics and the summary (docs/rl.md)
TIMERS = ("startup_s", "load_s", "model_load_s", "ref_s", "old_s", "update_s", "save_s", "wall_s")


@dataclass
class UpdateResult:
    metrics: dict
    adv_rows: list
    warnings: list[str]


class Learner:
    """One policy in training. `policy_dir` is loaded in float32 (bf16 autocast on CUDA; a LoRA
    run's frozen base in bf16 there; with cfg.bf16_weights the trained weights in bf16 and their
    float32 masters in the optimizer, master_weights.py); its optimizer.pt, when there is one,
    continues the parent's AdamW state. The reference (the run's initial policy unless `ref_dir`)
    is loaded at the first update that needs it, or is the LoRA base itself with its adapter off."""

    def __init__(self, policy_dir, cfg: RLConfig, ref_dir=None, device=None, dtype=None, lora_rank: int = 0,
                 progress: Progress | None = None, lora_from=None):
        self.cfg, self.lora_rank, self.progress = cfg, lora_rank, progress or Progress(quiet=True)
        torch.manual_seed(cfg.seed)
        device_type = resolve_device_dtype(device)[0].type
        # bf16 compute: on CUDA unless --dtype float32; on a CPU only for --bf16-weights with --dtype bfloat16
        self.use_bf16 = (device_type == "cuda" and dtype in (None, "bfloat16")) or \
            (cfg.bf16_weights and dtype == "bfloat16")
        accelerator = master_weights.MasterWeightsAccelerator if cfg.bf16_weights else Accelerator
        self.acc = acc = accelerator(mixed_precision="bf16" if self.use_bf16 else "no", cpu=device_type == "cpu")
        if cfg.bf16_weights:  # before any model loads
            master_weights.check_setup(self.use_bf16, lora_rank, acc.distributed_type)
        # under a distributed launch each process owns one GPU (acc.device); "cuda" alone would mean cuda:0
        on = str(acc.device) if acc.num_processes > 1 or device is None else device
        # LoRA trains only the adapter (peft keeps it in float32): its frozen base needs no fp32 master
        # copy, which at 7B would be 33 GB instead of 17
        base_dtype = "bfloat16" if (lora_rank and self.use_bf16) else "float32"
        self.policy = policy = load_policy(policy_dir, device=on, dtype=base_dtype)
        self.meta = meta = policy.meta
        model = policy.model
        freeze_vision(model)  # text-only policy: a VLM's vision tower and projector stay fixed
        if lora_rank:
            model = with_lora(model, lora_rank)
            if lora_from is not None:  # a LoRA run's checkpoint: its adapter on the base policy
                load_adapter(model, Path(lora_from) / ADAPTER_DIR)
        self.checkpointing = False
        if cfg.gradient_checkpointing is True:  # "auto": decided per update from the batch (_sized)
            set_checkpointing(model, True)
            self.checkpointing = True
        model.train()
        model.config.use_cache = False
        self.special = policy.special
        self.initial = str(ref_dir or meta.get("initial_policy") or Path(policy_dir).resolve())
        # --bf16-weights: the trained weights become bf16; AdamW updates their float32 masters
        self.master_weights = master_weights.MasterWeights(model) if cfg.bf16_weights else None
        self.fused = use_fused_adamw(model, cfg, acc)
        opt = make_optimizer(model, cfg, self.fused, self.master_weights.masters if self.master_weights else None)
        if self.master_weights:
            self.master_weights.copy_back_after_steps(opt)
        # the temperature is set per update from the samples (CompletionLogprobs.temperature)
        self.scorer, self.opt = acc.prepare(CompletionLogprobs(model, self.special, 1.0), opt)
        if self.master_weights:
            self.master_weights.attach(self.scorer, acc.num_processes)
            acc.master_weights = self.master_weights
        # a policy dir's optimizer.pt is the full model's: a LoRA learner takes only its own checkpoint's
        parent_opt = Path(lora_from or policy_dir) / "optimizer.pt"
        if parent_opt.exists() and (not lora_rank or lora_from is not None):
            state = load_optimizer_state(parent_opt)
            if self.master_weights:  # the same name-keyed state, onto the masters
                self.master_weights.load_optimizer_state(acc.unwrap_model(self.scorer), self.opt, state,
                                                         str(parent_opt))
            else:
                processes.load_optimizer_state(self.scorer, self.opt, state)
            set_fused(self.opt, self.fused)  # the parent's state carries its own run's kernel choice
        self.ref_scorer = None
        # a LoRA run's reference is its own base with the adapter switched off: no second copy
        self.reference_is_base = bool(lora_rank) and Path(self.initial).resolve() == Path(policy_dir).resolve()
        self.rl_step = int(meta.get("rl_step", 0))  # the step the loaded weights are at
        self.optimizer_updates = int(meta.get("optimizer_updates", 0))  # the warm-up continues across steps

    @property
    def model(self):
        """The trained transformers model (unwrapped from DDP/FSDP and the log-prob module)."""
        return self.acc.unwrap_model(self.scorer).model

    def reference(self) -> CompletionLogprobs:
        """The frozen reference; it needs no fp32 master weights: bf16 where the step computes in bf16."""
        if self.ref_scorer is None and self.reference_is_base:
            self.ref_scorer = BaseLogprobs(self.model, self.special, 1.0)
        if self.ref_scorer is None:
            ref_model = load_policy(self.initial, device=str(self.policy.device),
                                    dtype="bfloat16" if self.use_bf16 else "float32").model.eval()
            if self.acc.num_processes > 1:
                processes.broadcast_from_main(ref_model)
            self.ref_scorer = CompletionLogprobs(ref_model, self.special, 1.0)
        return self.ref_scorer

    def update(self, samples: list[dict], rewards: dict[str, dict], timings: dict | None = None,
               run_metrics: str | None = None) -> UpdateResult:
        """One step on `samples` (rows of a samples table, each with its reward "total": see
        read_batch) -> the step's metrics and advantages; the weights move in place."""
        cfg, acc, progress = self.cfg, self.acc, self.progress
        timings = dict(timings or {})
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        adv_rows, adv_stats = compute_advantages(
            samples, algo=cfg.algo, lam=cfg.lam, adv_std=cfg.adv_std, std_eps=cfg.std_eps,
            dynamic_sampling=cfg.dynamic_sampling, min_std=cfg.min_std, failed_rewards=cfg.failed_rewards,
            failed_penalty=cfg.failed_penalty, train_levels=cfg.train_levels)
        kept = kept_samples(samples, adv_rows)
        cfg = self._sized(cfg, kept)
        progress.log(f"rl-step: {len(kept)} of {len(samples)} samples train ({adv_stats['groups']} groups, "
                     f"{adv_stats['dropped_failed'] + adv_stats['dropped_no_spread']} dropped)")
        # log-probs must use the temperature the samples were drawn with (gen records it per row)
        sampled_at = float(samples[0].get("temperature") or 1.0) if samples else 1.0
        temperature = cfg.temperature or sampled_at
        acc.unwrap_model(self.scorer).temperature = float(temperature)
        ref_scorer = self.reference() if cfg.beta > 0 and kept else None
        if ref_scorer is not None:
            ref_scorer.temperature = float(temperature)
        timings["load_s"] = timings.get("load_s", 0.0) + time.time() - t0
        for r in kept:
            r.setdefault("reasoning_truncated", False)
        no_cudnn_attention()  # cuDNN attention's NaN gradients (policy/device.py)
        t1 = time.time()
        if ref_scorer is not None:
            progress.log(f"rl-step: reference log-probs of {len(kept)} samples")
            reference_logprobs(kept, ref_scorer, self.special, acc, cfg.micro_batch, cfg.length_buckets)
        timings["ref_s"] = time.time() - t1
        t_old = time.time()
        mismatch = None
        if cfg.old_logprobs == "recompute" and kept:
            progress.log(f"rl-step: recomputing the old log-probs of {len(kept)} samples")
            mismatch = recompute_old_logprobs(kept, self.scorer, self.special, acc, cfg)
        timings["old_s"] = time.time() - t_old
        t2 = time.time()
        stats = run_updates(kept, self.scorer, self.opt, acc, self.special, cfg, ref_scorer is not None,
                            self.optimizer_updates)
        if mismatch is not None:
            stats.mismatch = mismatch
        if cfg.tis_cap > 0 and kept:
            stats.tis = tis_metrics(kept, cfg.tis_cap)
        timings["update_s"] = time.time() - t2
        progress.log(f"rl-step: {stats.n_updates} update(s) in {timings['update_s']:.0f}s")
        if stats.skipped_updates:
            progress.log(f"WARNING: skipped {stats.skipped_updates} update(s) with a non-finite gradient norm")
        metrics = step_metrics(samples, adv_rows, adv_stats, kept, stats, timings, self.rl_step + 1, cfg, rewards)
        warnings = collapse_warnings(metrics, run_metrics)
        nothing = learned_nothing(kept, stats.n_updates, stats.skipped_updates)  # loud, and a metric
        warnings = [nothing] + warnings if nothing else warnings
        metrics["learned_nothing"] = int(nothing is not None)
        for w_ in warnings:
            progress.log(f"WARNING: {w_}")
        metrics["skipped_updates"] = stats.skipped_updates
        metrics["lr"] = float(np.mean(stats.lrs)) if stats.lrs else 0.0
        self.optimizer_updates += stats.n_updates
        self.rl_step += 1
        metrics["optimizer_updates"] = self.optimizer_updates
        metrics["warnings"] = "; ".join(warnings)
        return UpdateResult(metrics, adv_rows, warnings)

    def _sized(self, cfg: RLConfig, kept: list[dict]) -> RLConfig:
        """cfg with gradient checkpointing "auto" made on or off and micro_batch "auto" made a number,
        for this batch (micro_batch.py)."""
        if cfg.micro_batch != AUTO and cfg.gradient_checkpointing != AUTO:
            return cfg
        longest = max((len(r["input_ids"]) for r in kept), default=1)
        # a separate reference model takes memory too (loaded in bf16 on CUDA)
        reference = 0 if (self.reference_is_base or cfg.beta == 0) else \
            sum(p.numel() for p in self.model.parameters()) * (2 if self.use_bf16 else 4)
        if cfg.gradient_checkpointing == AUTO:
            need = needs_checkpointing(self.model, self.acc.device, longest, cfg.micro_batch, reference)
            # one setting for all processes (the card with the least memory decides)
            need = processes.min_over_processes(self.acc, 0 if need else 1) == 0
            if need != self.checkpointing:
                set_checkpointing(self.model, need)
                self.checkpointing = need
                self.progress.log(f"rl-step: gradient checkpointing auto: {'on' if need else 'off'} "
                                  f"(longest sequence {longest} tokens)")
            cfg = dataclasses.replace(cfg, gradient_checkpointing=need)
        if cfg.micro_batch != AUTO:
            return cfg
        rows = auto_rows(self.model, self.acc.device, longest, cfg.gradient_checkpointing, reference)
        # every process must cut the same micro-batches (their backward passes pair up): the smallest card's
        rows = processes.min_over_processes(self.acc, rows)
        self.progress.log(f"rl-step: micro-batch auto: {rows} sequences a forward pass (longest {longest} tokens)")
        return dataclasses.replace(cfg, micro_batch=rows)

    def full_state(self) -> tuple[dict | None, dict | None]:
        """Full CPU weights and optimizer state, gathered by every process (under FSDP each holds a
        shard); (None, None) for LoRA, whose adapter is merged on save. With --bf16-weights the
        trained weights are their float32 masters: the same tensors and keys as without it."""
        if self.lora_rank:
            return None, None
        if self.master_weights:
            return (self.master_weights.weights(self.model),
                    self.master_weights.optimizer_state(self.acc.unwrap_model(self.scorer), self.opt))
        return processes.full_state(self.scorer, self.opt)

    def lora_state(self) -> tuple[dict, dict]:
        """(adapter weights, optimizer state) as full CPU tensors: what a LoRA run checkpoints (the
        frozen base is the initial policy's, never written again)."""
        from peft import get_peft_model_state_dict

        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        return weights, processes.optimizer_state(self.scorer, self.opt)

    def copy_merged_into(self, model) -> None:
        """The LoRA policy's merged weights into `model` (the sampling copy), without a second copy
        of all of them."""
        copy_merged(self.model, model)

    def merged_weights(self) -> dict:
        """The LoRA policy's weights keyed as the plain model's, each adapted layer's delta added to
        its base weight (the adapter itself stays apart and trainable)."""
        return merged_state_dict(self.model)

    def model_to_save(self):
        model = self.model
        return model.merge_and_unload() if self.lora_rank else model


def read_batch(samples_path, rewards_path) -> tuple[list[dict], dict[str, dict]]:
    """The samples table's rows, each with its reward's total (None when the sample or its reward
    failed), and the rewards by sample id."""
    samples = tables.read_table(samples_path, "samples").to_pylist()
    rewards = {r["sample_id"]: r for r in tables.read_table(rewards_path, "rewards").to_pylist()}
    missing = [s["sample_id"] for s in samples if s["sample_id"] not in rewards]
    if missing:
        raise InputError(f"{rewards_path}: no reward row for sample {missing[0]} ({len(missing)} missing)")
    for s in samples:
        r = rewards[s["sample_id"]]
        s["total"] = r["total"] if s["status"] == "ok" and r["status"] == "ok" else None
        s["reward_status"], s["reward_message"] = r["status"], r["message"]
    return samples, rewards


def kept_samples(samples: list[dict], adv_rows) -> list[dict]:
    """The samples whose group was kept, in advantage-row order, each with its advantage."""
    by_id = {s["sample_id"]: s for s in samples}
    kept = []
    for a in adv_rows:
        if a.kept:
            by_id[a.sample_id]["advantage"] = a.advantage
            kept.append(by_id[a.sample_id])
    return kept


def set_checkpointing(model, on: bool) -> None:
    """Recompute (or keep) each decoder layer's activations in the backward pass; the newer method
    names where transformers has them (the old ones warn)."""
    if on:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def use_fused_adamw(model, cfg: RLConfig, acc) -> bool:
    """torch's fused AdamW (one kernel launch for all weights instead of several per tensor) when
    asked and every trained weight is a CUDA tensor. Not under FSDP, whose wrapper replaces the
    parameters after the optimizer is made."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (cfg.fused_adamw and bool(params) and all(p.is_cuda for p in params)
            and acc.distributed_type != DistributedType.FSDP)


def make_optimizer(model, cfg: RLConfig, fused: bool,
                   params: list[torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trained weights (fused: see use_fused_adamw), or over `params` in their
    place (--bf16-weights: their float32 masters, in the same order)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                             **({"fused": True} if fused else {}))


def set_fused(opt, fused: bool) -> None:
    """This run's AdamW kernel after loading a parent's state: load_state_dict takes every setting
    of the saved groups, so a parent written on another device (or before the fused kernel) would
    pick the kernel. The step counters go where the kernel keeps them (fused: on the weight's
    device; plain: on the CPU). Groups that already agree are left as they are (same bytes)."""
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        if bool(group.get("fused")) == fused:
            continue
        group["fused"] = True if fused else None
        for p in group["params"]:
            state = inner.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device if fused else "cpu")


class BaseLogprobs(CompletionLogprobs):
    """Log-probs of a peft model with its adapter disabled: the frozen base it wraps."""

    def forward(self, *args, **kwargs):
        with self.model.disable_adapter():
            return super().forward(*args, **kwargs)


def with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model  # optional (the lora extra): only for --lora-rank
    except ImportError:
        raise InputError("--lora-rank needs peft: pip install 'rl3d[lora]'") from None
    has_vision = any(n.split(".")[-1] in VISION_MODULES for n, _ in model.named_modules())
    # no adapters on a vision-language policy's (frozen) vision tower and projector
    vision = {"exclude_modules": rf"(.*\.)?({'|'.join(VISION_MODULES)})\..*"} if has_vision else {}
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, **vision)
    return get_peft_model(model, cfg)


ADAPTER_DIR = "adapter"  # a LoRA checkpoint's adapter (peft's files) beside its optimizer state


def save_adapter(model, weights: dict, out: Path) -> None:
    """A peft model's adapter as peft writes it (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(out))
    save_file(weights, str(out / "adapter_model.safetensors"))


def load_adapter(model, adapter: Path) -> None:
    """An adapter written by save_adapter into a model wrapped by with_lora (same rank and targets)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = adapter / "adapter_model.safetensors"
    try:
        state = load_file(str(f), device=str(next(model.parameters()).device))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{f}: cannot read the LoRA adapter ({type(e).__name__}: {e})") from None
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise InputError(f"{f}: not this run's adapter (no {missing[0]}; another --lora-rank or policy?)")


def merged_state_dict(model) -> dict:
    """A peft LoRA model's weights keyed as its base model's, with every adapted layer's delta
    (peft's get_delta_weight) added to its base weight; the model is left as it was."""
    return dict(merged_tensors(model))


def merged_tensors(model):
    """(name, tensor) of merged_state_dict one at a time: each adapted weight's merged copy exists
    only while it is used (at 7B, all of them at once would be 13 GB more on the GPU)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            owner = plain.rsplit(".", 1)[0]
            if key.endswith(".base_layer.weight") and owner in adapted:
                m = adapted[owner]
                value = value + sum(m.get_delta_weight(a) for a in m.active_adapters).to(value.dtype)
            yield plain, value


def copy_merged(model, into) -> None:
    """The LoRA model's merged weights copied into `into` (a plain model of the base's layout, any
    dtype), one tensor at a time."""
    target = into.state_dict()
    with torch.no_grad():
        for name, value in merged_tensors(model):
            if name in target:  # as load_state_dict(strict=False): keys only one layout has are left
                target[name].copy_(value)


def step_metrics(samples, adv_rows, adv_stats, kept, stats: UpdateStats, timings, step: int, cfg, rewards) -> dict:
    sums, level_loss, grad_norms = stats.sums, stats.level_loss, stats.grad_norms
    n_updates, n_tokens = stats.n_updates, stats.n_tokens
    m: dict = {"step": int(step), "updates": n_updates, "kept_samples": len(kept),
               "samples": len(samples), "dropped_groups": adv_stats["dropped_failed"] + adv_stats["dropped_no_spread"],
               "dropped_failed": adv_stats["dropped_failed"], "dropped_no_spread": adv_stats["dropped_no_spread"],
               "penalized_failed": adv_stats["penalized_failed"],
               "groups": adv_stats["groups"]}
    m["loss"] = sum(level_loss.values()) / max(cfg.epochs, 1)
    for lv, v in level_loss.items():
        if any(r["level"] == lv for r in kept):
            m[f"loss_{lv}"] = v / max(cfg.epochs, 1)
    n_mb = max(n_updates, 1)
    m["pg_loss"] = sums.get("pg", 0.0) / n_mb
    for k in diagnostics(cfg):
        if k != "pg":  # pg_loss above
            m[k] = sums.get(k, 0.0) / n_mb
    m["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
    # entropy estimate: mean negative log-prob of the sampled tokens (an unbiased estimate of the
    # per-token entropy of the sampling distribution) over the tokens that carry a choice
    nll = {"reasoning": 0.0, "mesh": 0.0}
    cnt = {"reasoning": 0, "mesh": 0}
    for s in samples:
        lp = np.asarray(s["logprobs"], np.float64)
        split = s["reasoning_end"] + 1 - s["prompt_len"]  # reasoning tokens and <mesh-start>
        for part, x in (("reasoning", lp[:split]), ("mesh", lp[split: s["mesh_end"] - s["prompt_len"]])):
            nll[part] -= x.sum()
            cnt[part] += len(x)
    m["entropy"] = sum(nll.values()) / max(sum(cnt.values()), 1)
    m["entropy_reasoning"] = nll["reasoning"] / max(cnt["reasoning"], 1)
    m["entropy_mesh"] = nll["mesh"] / max(cnt["mesh"], 1)
    for lv in LEVELS:
        vals = [s["total"] for s in samples if s["level"] == lv and s["total"] is not None]
        if vals:
            m[f"reward_mean_{lv}"] = float(np.mean(vals))
            m[f"reward_std_{lv}"] = float(np.std(vals))
        advs = [a.advantage for a in adv_rows if a.level == lv and a.kept]
        if advs:
            m[f"adv_mean_{lv}"], m[f"adv_std_{lv}"] = float(np.mean(advs)), float(np.std(advs))
            m[f"adv_abs_max_{lv}"] = float(np.max(np.abs(advs)))
    # reward terms: mean raw value per term and level (columns <term>_raw in the rewards table)
    for r in rewards.values():
        for k, v in r.items():
            if k.endswith("_raw") and isinstance(v, (int, float)) and v is not None:
                key = f"term_{k[:-4]}_{r['level']}"
                m.setdefault(key, []).append(float(v))
    for k in [k for k in m if k.startswith("term_")]:
        m[k] = float(np.mean(m[k]))
    m["diversity_identical_frac"] = identical_fraction(samples)
    m["tokens"] = n_tokens
    m.update(stats.mismatch or mismatch_metrics({}))  # zeros and mismatch_tokens 0 when nothing trained
    if stats.tis:
        m.update(stats.tis)
    total_s = sum(timings.values())
    m["tokens_per_s"] = n_tokens / max(timings.get("update_s", 0.0), 1e-9)
    m.update({k: round(v, 3) for k, v in timings.items()})
    m["wall_s"] = round(total_s, 3)
    return m


def identical_fraction(samples) -> float:
    """Fraction of (prompt, level) groups whose samples all produced the same mesh tokens."""
    groups: dict = {}
    for s in samples:
        groups.setdefault((s["prompt_id"], s["level"]), []).append(tuple(s["mesh_tokens"] or ()))
    multi = [g for g in groups.values() if len(g) > 1]
    return float(np.mean([len(set(g)) == 1 for g in multi])) if multi else 0.0


def collapse_warnings(m: dict, run_metrics: str | None) -> list[str]:
    import pyarrow.parquet as pq

    out = []
    if m["diversity_identical_frac"] >= 0.5:
        out.append(f"within-group diversity collapsed: {m['diversity_identical_frac']:.0%} of groups sampled "
                   f"identical meshes (mode collapse; consider fewer RL steps, higher temperature or a larger beta)")
    if run_metrics and Path(run_metrics).exists():
        prev = pq.read_table(run_metrics).to_pylist()
        first = [r["value"] for r in prev if r["name"] == "entropy"]
        if first and m["entropy"] < 0.5 * first[0]:
            out.append(f"entropy collapsed: {m['entropy']:.3f} nats/token vs {first[0]:.3f} at the run's first step")
    return out


def update_tables(adv_rows, metrics: dict, config: dict, policy_id: str | None) -> tuple[pa.Table, pa.Table]:
    """The step's advantages table and metrics table (one row per metric), with provenance."""
    adv = pa.table({"sample_id": [a.sample_id for a in adv_rows], "prompt_id": [a.prompt_id for a in adv_rows],
                    "sample_index": pa.array([a.sample_index for a in adv_rows], pa.int32()),
                    "level": [a.level for a in adv_rows], "reward": [a.reward for a in adv_rows],
                    "advantage": [a.advantage for a in adv_rows], "kept": [a.kept for a in adv_rows],
                    "reason": [a.reason for a in adv_rows]})
    rows = [(k, float(v)) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mt = pa.table({"step": pa.array([metrics["step"]] * len(rows), pa.int64()), "name": [k for k, _ in rows],
                   "value": [v for _, v in rows]})
    return (tables.with_metadata(adv, "advantages", config, policy_id),
            tables.with_metadata(mt, "metrics", config, policy_id))


def summary_fields(metrics: dict) -> dict:
    """The metrics a step's one-line summary and --json carry."""
    return {k: metrics[k] for k in
            ("loss", "kl", "reward_mean_coarse", "reward_mean_fine", "reward_mean_single", "kept_samples",
             "dropped_groups", "grad_norm", "learned_nothing", "mismatch_abs_mean", "mismatch_abs_max",
             "mismatch_clip_frac", "tis_weight_mean", "tis_clip_frac", *TIMERS) if k in metrics}
