"""`rl3d gen`: rollouts of the policy, flat (one level) or Hi-GRPO (coarse plan + mesh, then fine
detail + mesh), written as a samples table plus one GLB per decodable sample.

The sampling itself (constrained, counter-based randomness, so rollouts do not depend on batch
composition or sharding) is stages/policy/sampler.py; the sequence layout is stages/policy/sequence.py.
"""
from __future__ import annotations

import concurrent.futures
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.codecs import codec_format, codec_seq_len
from rl3d.formats.errors import InputError
from rl3d.formats.glb import write_glb
from rl3d.formats.occupancy import occupancy_to_mesh
from rl3d.formats.prompts import read_prompts
from rl3d.formats.voxels import grid_to_mesh
from rl3d.stages.contract import PLAIN_EVERY_S, Job, Progress, StageOptions, usable_cores
from rl3d.stages.policy.checkpoint import Policy, codec_path, load_policy, open_policy_dir
from rl3d.stages.policy.device import resolve_device_dtype
from rl3d.stages.policy.limits import check_prompts_fit
from rl3d.stages.policy.sampler import Sampling, resolve_sampling, row_seed, sample_sequences
from rl3d.stages.policy.sequence import INSTRUCTIONS, MODE_LEVELS, REQUEST, build_prompt, encode_texts, sequence_spans
from rl3d.stages.policy.sampler_engines import SAMPLERS, choose_sampler
from rl3d.stages.policy.tokenizer import describe_mesh_ids
from rl3d.stages.texturing import parse_hook, texture_meshes

SAMPLED_MODES = {mode: MODE_LEVELS[mode] for mode in ("flat", "hi-grpo")}  # the modes gen samples, and their levels


# ---- rollouts -> sample rows ---------------------------------------------------------------------

def generate(policy: Policy, prompt_rows: list[dict], mode: str = "hi-grpo", group_size: int = 8,
             seed: int = 0, sampling: Sampling = Sampling(), batch_size: int = 64, out_dir: str | Path | None = None,
             progress: Progress | None = None, sampler: str = "auto", mesh_pool=None) -> list[dict]:
    """Rollouts for prompt rows (dicts with prompt_id, prompt and optional category/spec): G samples
    per prompt and level, coarse before fine. With out_dir, decodable meshes are written to
    out_dir/_meshes/<sample_id>.glb (mesh_path relative to out_dir); without, mesh_path stays None."""
    if mode not in SAMPLED_MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(SAMPLED_MODES)}")
    if group_size < 1 or batch_size < 1:
        raise InputError("--group-size and --batch-size must be >= 1")
    sampling.check()
    progress = progress or Progress(quiet=True)
    _, sample_fn = choose_sampler(sampler, policy.device)
    jobs = [(r, k) for r in prompt_rows for k in range(group_size)]
    plans: dict[tuple[str, int], str] = {}
    rows: list[dict] = []
    meter = GenMeter(progress, len(jobs) * len(SAMPLED_MODES[mode]))
    with MeshWriter(out_dir, coloured=policy.codec.coloured, pool=mesh_pool) as write_mesh:
        for level in SAMPLED_MODES[mode]:
            meter.level = level
            texts = [build_prompt(r["prompt"], level, plan=plans.get((r["prompt_id"], k)), fmt=policy.prompt_format)
                     for r, k in jobs]
            for s in range(0, len(jobs), batch_size):
                chunk = jobs[s:s + batch_size]
                level_rows = _sample_chunk(policy, chunk, texts[s:s + batch_size], level, seed, sampling,
                                           write_mesh, sample_fn, meter.tokens_sampled)
                for (r, k), row in zip(chunk, level_rows):
                    plans[(r["prompt_id"], k)] = row["reasoning"]
                rows += level_rows
                meter.sequences_done(len(chunk), last=s + batch_size >= len(jobs))
    return rows


class GenMeter:
    """gen's progress: sequences done of all levels' total, tokens sampled, and the rate of each, as a
    line every PLAIN_EVERY_S seconds, in the middle of a batch too (on a CPU one batch of 64 sequences
    of ~600 tokens takes minutes), and a line at the end of each level. Nothing with --quiet."""

    def __init__(self, progress: Progress, total: int, every: float | None = None):
        self.progress, self.total = progress, total
        # a little under the Progress keep-alive's period, so a counted line comes before a repeated one
        self.every = 0.8 * PLAIN_EVERY_S if every is None else every
        self.t0 = self.last = time.time()
        self.sequences = self.tokens = 0
        self.level = ""

    def tokens_sampled(self, n: int) -> None:
        self.tokens += n
        if time.time() - self.last >= self.every:
            self._print()

    def sequences_done(self, n: int, last: bool = False) -> None:
        self.sequences += n
        if last or time.time() - self.last >= self.every:
            self._print()

    def line(self) -> str:
        """"gen coarse: 24/48 sequences (50%), 14,400 tokens; 0.81 seq/s, 486 tok/s; 30s elapsed, ETA 30s"."""
        el = max(time.time() - self.t0, 1e-9)
        eta = f", ETA {el / self.sequences * (self.total - self.sequences):.0f}s" if self.sequences else ""
        return (f"gen {self.level}: {self.sequences}/{self.total} sequences ({100 * self.sequences / self.total:.0f}%), "
                f"{self.tokens:,} tokens; {self.sequences / el:.2f} seq/s, {self.tokens / el:.0f} tok/s; "
                f"{el:.0f}s elapsed{eta}")

    def _print(self) -> None:
        self.last = time.time()
        self.progress.log(self.line())


class MeshWriter:
    """Writes each decodable sample's GLB on workers while the next batch samples: meshing takes
    ~20 ms a sample on one core (1024 samples: ~20 s, most of a GPU gen's wall time when done in
    line). Threads by default; `pool`, a process pool the caller keeps (rl3d train's), takes the
    writes out of this process: trimesh's Python work holds the GIL, and on threads it slowed the
    sampler's own loop (a GPU profile of rl3d train: gen 14.4 s a step, its sampling ~5 s).
    Called with (grid, sample_id), it returns the mesh_path at once (None without an out_dir); on
    leaving the block every write has finished, and the first failed one raises."""

    def __init__(self, out_dir: str | Path | None, coloured: bool = True, workers: int | None = None, pool=None):
        self.out = Path(out_dir) if out_dir is not None else None
        self.coloured = coloured
        self.own_pool = pool is None
        self.pool = None if self.out is None else \
            (pool if pool is not None else ThreadPoolExecutor(workers or min(8, usable_cores())))
        self.folder = None if self.out is None else shards_io.inside(self.out, shards_io.MESHES)
        self.pending: list = []

    def __call__(self, grid: np.ndarray, sample_id: str) -> str | None:
        if self.pool is None:
            return None
        path = shards_io.child(self.folder, f"{sample_id}.glb")  # an id that would leave the folder fails at once
        self.pending.append(self.pool.submit(_write_mesh_file, grid, path, self.coloured))
        return f"{shards_io.MESHES}/{path.name}"

    def __enter__(self) -> "MeshWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        if exc_type is not None:
            for f in self.pending:
                f.cancel()
        if self.own_pool:
            self.pool.shutdown(wait=True)
        else:
            concurrent.futures.wait(self.pending)
        if exc_type is None:
            for f in self.pending:
                f.result()  # the first failed write raises here


def _sample_chunk(policy: Policy, chunk, texts, level, seed, sampling: Sampling, write_mesh,
                  sample_fn=sample_sequences, on_step=None) -> list[dict]:
    tok, special, codec = policy.tokenizer, policy.special, policy.codec
    prompt_ids = encode_texts(tok, texts)
    seeds = [row_seed(seed, r["prompt_id"], k, level) for r, k in chunk]
    done = sample_fn(policy.model, special, prompt_ids, seeds, codec.seq_len, sampling, on_step=on_step)
    sequences = [prompt_ids[i] + d["tokens"] for i, d in enumerate(done)]
    spans = [sequence_spans(len(prompt_ids[i]), d["n_reasoning"], codec.seq_len) for i, d in enumerate(done)]
    reasoning = tok.batch_decode([ids[s["reasoning_start"]:s["reasoning_end"]] for ids, s in zip(sequences, spans)],
                                 skip_special_tokens=True)
    lut = special.codec_lookup()
    mesh = np.stack([lut[torch.as_tensor(ids[s["mesh_start"]:s["mesh_end"]])].numpy()
                     for ids, s in zip(sequences, spans)]).astype(np.int32)
    grids = codec.decode_batch(mesh)  # the sampler only emits mesh ids, so every sequence decodes to a grid
    out = []
    for i, ((r, k), d) in enumerate(zip(chunk, done)):
        sid = f"{r['prompt_id']}-{k}-{level}"
        status, message, mesh_path = "ok", "", None
        if not grids[i].any():
            status, message = "decode_error", "empty grid: every mesh token is the empty block"
        else:
            mesh_path = write_mesh(grids[i], sid)
        row = {
            "sample_id": sid, "prompt_id": r["prompt_id"], "sample_index": k, "level": level,
            "prompt": r["prompt"], "input_ids": sequences[i], **spans[i],
            "logprobs": d["logprobs"], "reasoning": reasoning[i], "mesh_tokens": mesh[i],
            "reasoning_truncated": d["truncated"], "status": status, "message": message, "mesh_path": mesh_path,
            "policy_id": policy.policy_id, "policy_step": policy.step, "seed": int(seed),
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        }
        for extra in ("category", "spec"):
            if r.get(extra) is not None:
                row[extra] = r[extra]
        out.append(row)
    return out


def _write_mesh_file(grid: np.ndarray, path: Path, coloured: bool = True) -> None:
    """The block codec's palette grids keep their colours; the VQ-VAE's occupancy (no colour) is
    a neutral grey mesh (formats/occupancy.py)."""
    write_glb(grid_to_mesh(grid) if coloured else occupancy_to_mesh(grid), path)


# ---- the samples table -----------------------------------------------------------------------------

_TEXTURE = {"textured_path": pa.string(), "texture_status": pa.string(), "texture_message": pa.string(),
            "texture_seconds": pa.float64()}
_EXTRA = {"reasoning_truncated": pa.bool_(), "temperature": pa.float64(), "top_p": pa.float64(),
          "top_k": pa.int32(), "category": pa.string(), "spec": pa.string()}


def samples_table(rows: list[dict], with_category: bool = False, with_spec: bool = False) -> pa.Table:
    _, cols = tables.SCHEMAS["samples"]
    fields = dict(cols)
    fields.update({k: v for k, v in _EXTRA.items() if k not in ("category", "spec")})
    if with_category or any("category" in r for r in rows):
        fields["category"] = pa.string()
    if with_spec or any("spec" in r for r in rows):
        fields["spec"] = pa.string()
    if any("texture_status" in r for r in rows):  # only with --texture-hook: default outputs unchanged
        fields.update(_TEXTURE)
    schema = pa.schema([pa.field(k, t) for k, t in fields.items()])
    data = {}
    for k, t in fields.items():
        vals = [r.get(k) for r in rows]
        if pa.types.is_list(t):
            vals = [np.asarray(v, dtype=t.value_type.to_pandas_dtype()) for v in vals]
        data[k] = pa.array(vals, type=t)
    return pa.table(data, schema=schema)


def default_batch_size(device) -> int:
    """Sequences sampled together when --batch-size is not given: a GPU step costs nearly the same
    for 64 rows as for 256 (docs/performance.md), a CPU step grows with the rows."""
    return 256 if torch.device(device).type == "cuda" else 64


# ---- the stage -----------------------------------------------------------------------------------

@dataclass
class GenOptions:
    """`rl3d gen`'s options besides the stage contract's. `sampling` None: resolved from
    `sampling_preset` (None = the policy's own, else the defaults) and the explicitly given
    `sampling_overrides` (stages/policy/sampler.py resolve_sampling). `meshes` False: the samples
    table only, no GLBs (rewards on the grid decode the tokens; render needs them)."""
    mode: str = "hi-grpo"
    group_size: int = 8
    sampling: Sampling | None = Sampling()
    batch_size: int | None = None
    device: str | None = None
    dtype: str | None = None
    sampling_preset: str | None = None
    sampling_overrides: dict | None = None
    texture_hook: str | None = None
    texture_timeout: float = 600.0
    sampler: str = "auto"
    meshes: bool = True


class GenJob(Job):
    """Rollouts of a policy for a prompts file or table. `policy`: a loaded Policy to sample with
    (the resident loop's; it must be in the dtype and on the device the options resolve to), else
    `policy_dir` (None = the shipped default) is loaded when a shard runs."""

    stage, kind = "gen", "samples"

    def __init__(self, prompts_path: str | Path, options: GenOptions = GenOptions(), seed: int = 0,
                 policy_dir: str | Path | None = None, policy: Policy | None = None, mesh_pool=None):
        o = self.options = options
        self.mesh_pool = mesh_pool  # a process pool for the GLB writes (MeshWriter); None: threads
        if o.mode not in SAMPLED_MODES:
            raise InputError(f"--mode {o.mode!r}: expected one of {', '.join(SAMPLED_MODES)}")
        if o.group_size < 1 or (o.batch_size is not None and o.batch_size < 1):
            raise InputError("--group-size and --batch-size must be >= 1")
        if o.sampler not in SAMPLERS:
            raise InputError(f"--sampler {o.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        self.hook = parse_hook(o.texture_hook) if o.texture_hook else None  # a bad spec fails before any work
        if self.hook is not None and not o.meshes:
            raise InputError("--texture-hook paints the GLBs that --no-meshes leaves out: use one of them")
        self.prompts_path, self.seed, self.resident = prompts_path, int(seed), policy
        self.prompts = read_prompts(prompts_path)
        # the policy dir is read and its weights hashed once: the model loads from the same object
        # when a shard runs (a resident policy is used as it is)
        self.opened = None if policy is not None else open_policy_dir(policy_dir)  # None = the shipped default
        known = policy or self.opened
        path, meta, pid = Path(known.path), known.meta, known.policy_id
        self.path, self.policy = path, pid
        sampling = o.sampling
        if sampling is None:
            sampling = resolve_sampling(o.sampling_preset, meta, **(o.sampling_overrides or {}))
        sampling.check()
        self.sampling = sampling
        _, dt = resolve_device_dtype(o.device, o.dtype)
        self.levels = levels = SAMPLED_MODES[o.mode]
        config = {
            "stage": "gen", "prompts": str(Path(prompts_path).resolve()), "policy_id": pid, "mode": o.mode,
            "levels": list(levels), "group_size": o.group_size, "seed": self.seed, "dtype": str(dt),
            "sampling": asdict(sampling), "codec_hash": meta.get("codec_hash"),
            "request": meta.get("request_template") or REQUEST, "instructions": {lv: INSTRUCTIONS[lv] for lv in levels},
        }
        codec_file = codec_path(path, meta)
        if codec_format(codec_file).external:  # outside the policy dir: reward decodes the tokens with it
            config["codec"] = str(codec_file.resolve())
        if o.sampler != "auto":  # only when chosen: default outputs unchanged (stats name the engine auto picked)
            config["sampler"] = o.sampler
        if not o.meshes:  # only when off: default outputs unchanged
            config["meshes"] = False
        if o.texture_hook:  # only with a hook: default outputs unchanged
            config["texture_hook"], config["texture_timeout"] = o.texture_hook, float(o.texture_timeout)
        for key in ("chat_template", "system_prompt"):  # only where the policy sets them: default outputs unchanged
            if meta.get(key):
                config[key] = meta[key]
        self._config = config
        # input guard: refuse prompts beyond the policy's positions before any output is touched
        mesh_tokens = policy.codec.seq_len if policy is not None else codec_seq_len(codec_file)
        check_prompts_fit(path, known.tokenizer, known.prompt_format, mesh_tokens, self.prompts.to_pylist(), levels,
                          sampling.max_reasoning_tokens, str(prompts_path))
        config["prompts_content"] = tables.content_hash(self.prompts)  # the same path with other prompts is another run
        self.has_cat = "category" in self.prompts.column_names and \
            self.prompts.column("category").null_count < self.prompts.num_rows
        self.has_spec = "spec" in self.prompts.column_names
        self.out: Path | None = None  # set by run(): where the meshes go

    def config(self) -> dict:
        return self._config

    def run(self, opts: StageOptions) -> dict:
        shards_io.check_out_apart(opts.out, {"--prompts": self.prompts_path, "--policy": self.path})
        self.out = Path(opts.out)
        return super().run(opts)

    def produce(self, shard, progress):
        o = self.options
        rows = [r for r in self.prompts.to_pylist() if shard.owns(r["prompt_id"])]
        stats: dict = {"prompts": len(rows), "batch_size": o.batch_size}
        if not rows:
            return samples_table([], self.has_cat, self.has_spec), stats
        t0 = time.time()
        policy = self.resident or load_policy(device=o.device, dtype=o.dtype, opened=self.opened)
        stats["batch_size"] = batch = o.batch_size or default_batch_size(policy.device)
        progress.log(f"gen: {len(rows)} prompts x {o.group_size} x {len(self.levels)} level(s) with "
                     f"{policy.policy_id}")
        stats["sampler"] = choose_sampler(o.sampler, policy.device)[0]
        out = generate(policy, rows, o.mode, o.group_size, self.seed, self.sampling, batch,
                       self.out if o.meshes else None, progress, o.sampler, self.mesh_pool)
        stats["seconds_generate"] = round(time.time() - t0, 3)
        if self.hook is not None:  # an external texturing stage (e.g. TRELLIS stage 2) paints each mesh
            out = texture_meshes(out, self.hook, self.out, o.texture_timeout)
            stats["textured"] = sum(r.get("texture_status") == "ok" for r in out)
        stats["ok"] = sum(r["status"] == "ok" for r in out)
        stats["decode_error"] = sum(r["status"] == "decode_error" for r in out)
        stats["reasoning_truncated"] = sum(r["reasoning_truncated"] for r in out)
        stats["tokens"] = sum(len(r["input_ids"]) - r["prompt_len"] for r in out)
        stats.update(describe_mesh_ids(policy.special))  # the mesh ids found in the tokenizer, by name
        return samples_table(out, self.has_cat, self.has_spec), stats


def run_gen(prompts_path: str | Path, opts: StageOptions, policy_dir: str | Path | None = None,
            mode: str = "hi-grpo", group_size: int = 8, sampling: Sampling | None = Sampling(),
            batch_size: int | None = None,
            device: str | None = None, dtype: str | None = None, sampling_preset: str | None = None,
            sampling_overrides: dict | None = None, texture_hook: str | None = None,
            texture_timeout: float = 600.0, sampler: str = "auto", meshes: bool = True) -> dict:
    """Generate the shard's rollouts into opts.out (resumable, shardable by prompt_id): GenJob, driven once."""
    options = GenOptions(mode, group_size, sampling, batch_size, device, dtype, sampling_preset, sampling_overrides,
                         texture_hook, texture_timeout, sampler, meshes)
    return GenJob(prompts_path, options, opts.seed, policy_dir).run(opts)
