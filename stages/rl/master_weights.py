"""`--bf16-weights`: the policy's trained parameters in bf16, their float32 master copies (and
AdamW's state) in the optimizer.

Under bf16 autocast with float32 parameters every matrix product casts its weight to bf16, in
the forward and again in the backward: 28% of a 0.5B update's GPU time on an H100
(docs/performance.md). Here the trained parameters are bf16 themselves, so the products read them
as they are, and their float32 values live apart as the tensors AdamW updates:

- each parameter's bf16 gradient is moved into its master's float32 gradient as soon as a
  backward pass has accumulated it (a post-accumulate-grad hook): micro-batches sum in float32;
- the gradient norm and clipping act on the masters' gradients (MasterWeightsAccelerator's
  clip_grad_norm_, the call run_updates makes), so the norm is the float32 one as without the
  flag, and a non-finite norm still skips the update (zero_grad drops the masters' gradients);
- after every optimizer step the masters are copied, rounded, into the bf16 parameters;
- checkpoints take the masters: the same float32 safetensors and the same name-keyed optimizer.pt
  as without the flag, so either kind of run continues from the other's checkpoint.

Under DDP the backward passes do not all-reduce (the wrapper's gradient sync is off, as inside
its no_sync()); the masters' float32 gradients are averaged over processes once per optimizer
update, before the norm. Not under FSDP (its wrapper replaces the parameters after the
optimizer is made) nor with LoRA (whose frozen base is already bf16 and whose adapter is float32).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rl3d.formats.errors import InputError

FLAG = "--bf16-weights"
# float32 elements a process all-reduces at once under DDP (512 MB): the gradients go in buckets,
# not as one flat copy of all of them
REDUCE_BUCKET = 1 << 27


def check_setup(bf16_compute: bool, lora_rank: int, distributed_type) -> None:
    """InputError (one line) for a run that cannot keep bf16 weights with float32 masters."""
    if not bf16_compute:
        raise InputError(f"{FLAG}: the weights are kept in bf16 for bf16 compute, which this run does not "
                         f"use (on a CPU pass --dtype bfloat16; --dtype float32 computes in float32)")
    if lora_rank:
        raise InputError(f"{FLAG} with --lora-rank: a LoRA run already keeps its frozen base in bf16 and "
                         f"trains a float32 adapter; drop one of the two")
    if distributed_type == DistributedType.FSDP:
        raise InputError(f"{FLAG} under FSDP: not supported (FSDP replaces the parameters after the "
                         f"optimizer is made); launch with DDP or drop the flag")
    if distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise InputError(f"{FLAG} under {distributed_type}: only one process or DDP is supported")


class MasterWeights:
    """The float32 masters of a model's trained parameters, which it turns into `dtype`. The
    masters are the parameters' loaded float32 tensors themselves (no copy is made of them)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters: list[torch.Tensor] = []
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.unreduced = False  # gradients arrived since the last sum over processes
        for p in self.params:
            master = p.data if p.dtype == torch.float32 else p.data.float()
            p.data = master.to(dtype)
            p.register_post_accumulate_grad_hook(self._gradient_mover(master))
            self.masters.append(master)

    def _gradient_mover(self, master: torch.Tensor):
        """A hook moving a parameter's fresh gradient into `master`'s float32 one (summed there)."""
        def move(param: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = param.grad.to(torch.float32)
            else:
                master.grad.add_(param.grad)
            param.grad = None  # its memory is free before the next micro-batch's backward
            self.unreduced = True
        return move  # a deepcopy of the model (rl3d train's sampling copy) carries no such hook

    def copy_back_after_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """After every step of `optimizer` (which updates the masters), the bf16 parameters follow."""
        optimizer.register_step_post_hook(lambda *_: self.copy_to_params())

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, master in zip(self.params, self.masters):
            p.copy_(master)

    def attach(self, scorer: torch.nn.Module, num_processes: int) -> None:
        """After accelerate's prepare: under DDP take over the gradient reduction (see the module's
        docstring) and start every process from process 0's masters (an FSDP-style launch loads
        the weights on process 0 only; the DDP wrapper broadcasts only the bf16 parameters)."""
        if num_processes == 1:
            return
        if isinstance(scorer, torch.nn.parallel.DistributedDataParallel):
            scorer.require_backward_grad_sync = False
            self.ddp = scorer
        for master in self.masters:
            dist.broadcast(master, src=0)
        self.copy_to_params()

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """torch's clip_grad_norm_ on the masters of `parameters` (the model's, as run_updates
        passes them): their float32 gradients, first averaged over processes under DDP."""
        chosen = {id(p) for p in parameters}
        self.average_over_processes()
        masters = [m for p, m in zip(self.params, self.masters) if id(p) in chosen]
        return torch.nn.utils.clip_grad_norm_(masters, max_norm, norm_type=norm_type)

    def average_over_processes(self) -> None:
        """Under DDP: every master gradient replaced by its mean over processes (DDP's own mean,
        which the update's token weights assume), in float32 and in buckets. A master that got no
        gradient on some process counts as zero there; one that got none anywhere stays None."""
        if self.ddp is None or not self.unreduced:
            return
        self.unreduced = False
        device = self.masters[0].device
        present = torch.tensor([m.grad is not None for m in self.masters], dtype=torch.float32, device=device)
        dist.all_reduce(present)
        grads = []
        for m, anywhere in zip(self.masters, present.tolist()):
            if anywhere:
                if m.grad is None:
                    m.grad = torch.zeros_like(m)
                grads.append(m.grad)
        world = dist.get_world_size()
        for bucket in _buckets(grads, REDUCE_BUCKET):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def names(self, scorer: torch.nn.Module) -> list[str]:
        """Each master's name: its parameter's in the (unwrapped) scorer, as optimizer.pt keys them."""
        name_of = {id(p): name for name, p in scorer.named_parameters()}
        return [name_of[id(p)] for p in self.params]

    def weights(self, model: torch.nn.Module) -> dict:
        """The model's state dict on the CPU with every trained weight's value its float32 master
        (a tied weight under each of its names): what a run without the flag checkpoints."""
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        return {name: master_of.get(id(t), t).detach().cpu() for name, t in model.state_dict(keep_vars=True).items()}

    def optimizer_state(self, scorer: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state as torch.distributed.checkpoint's full state dict writes it for
        a plain run (keyed by parameter name, on the CPU), so optimizer.pt is the same either way."""
        names = self.names(scorer)
        inner = getattr(optimizer, "optimizer", optimizer)
        state = inner.state_dict()
        return {"state": {names[i]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                          for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}

    def load_optimizer_state(self, scorer: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                             source: str) -> None:
        """A parent's optimizer.pt (by name, or by position as checkpoints before named keys are)
        into the optimizer over the masters."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if all(isinstance(k, int) for k in state.get("state", {})):
            inner.load_state_dict(state)
            return
        index = {name: i for i, name in enumerate(self.names(scorer))}
        saved = [k for g in state.get("param_groups", []) for k in g.get("params", [])]
        if sorted(saved) != sorted(index):
            which = next(iter(set(saved) ^ set(index)), None)
            raise InputError(f"{source}: the optimizer state is of other weights than this policy trains "
                             f"({len(saved)} against {len(index)}; {which!r} is in one only)")
        inner.load_state_dict({
            "state": {index[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]})


class MasterWeightsAccelerator(Accelerator):
    """accelerate's Accelerator whose clip_grad_norm_ clips the float32 masters' gradients once a
    MasterWeights is attached (the model's bf16 parameters hold no gradient between backward
    passes and the step)."""

    master_weights: MasterWeights | None = None

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        if self.master_weights is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type)
        return self.master_weights.clip_grad_norm_(parameters, max_norm, norm_type)


def _buckets(tensors: list[torch.Tensor], limit: int):
    """Consecutive runs of `tensors` of at most `limit` elements each (a larger tensor alone)."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket
