"""Streaming conversions: HF (one or several source dirs) -> megatron dist checkpoint -> HF.

hf -> mcore builds no model tensors: a meta-device model gives megatron's checkpoint layout, and each
stored tensor piece (at most 64 MiB of rows, or one fused q/k/v) is read from the HF files when torch
DCP's writer asks for it and dropped once written (`lazy_save`), in one process or spread over several.
mcore -> hf runs in one process and reads one group at a time from the dist checkpoint (`GroupReader`),
so it holds one group plus the HF shard being written.

Outputs are written to `<out>.partial` and renamed at the end: a killed conversion leaves no
half-written checkpoint under the requested name.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from engine.checkpoint.adapters import ADAPTERS, IMG_CONTEXT, Adapter, tokenizer_token_id, check_model_dict, detect_layout
from engine.checkpoint.atomic import atomic_output_dir, is_nonempty, rank
from engine.checkpoint.conversion_config import engine_config
from engine.checkpoint.hf_io import AUX_FILES, CheckpointError, HFReader, HFWriter, copy_aux_files, read_config
from engine.checkpoint.hf_rows import HFRows
from engine.checkpoint.keymap import mappings, num_layers
from engine.checkpoint.lazy_save import MAX_PIECE_BYTES, build_layout
from engine.checkpoint.lazy_save import save as save_pieces
from engine.checkpoint.mcore_io import VOCAB_PARAM_NAMES, GroupReader, read_meta, write_meta
from engine.config.base import ConfigError
from engine.model.transformer_configs import torch_dtype

TOKENIZER_SUBDIR = "hf_files"  # tokenizer / processor / generation files kept with a dist checkpoint


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where one model part is read from."""

    dir: Path
    adapter: Adapter
    hf_config: dict
    model_dict: dict
    _reader: HFReader | None = field(default=None, repr=False)

    @property
    def reader(self) -> HFReader:
        if self._reader is None:
            self._reader = HFReader(self.dir)
        return self._reader


def open_source(hf_dir: str | Path, image_token_id: int | None = None) -> Source:
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    adapter = detect_layout(cfg, f"{hf_dir}/config.json")
    try:
        md = adapter.model_dict(cfg, hf_dir) if image_token_id is None or adapter.name != "internvl_chat" else \
            adapter.model_dict({**cfg, "img_context_token_id": image_token_id}, hf_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{hf_dir}/config.json: missing key {e} for a {adapter.name} config") from None
    src = Source(hf_dir, adapter, cfg, md)
    src.reader  # opens the index and shard headers now: a missing/corrupt shard fails before any model is built
    return src


def _tokenizer_digest(d: Path) -> str | None:
    f = d / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else None


def _vocab_of(src: Source) -> int | None:
    return src.model_dict.get("llm", {}).get("vocab_size")


def tokenizer_report(vision: Source, connector: Source | None, llm: Source) -> list[str]:
    """Differences between the LLM's tokenizer and the ones the vision/connector were trained with."""
    notes = []
    llm_digest, llm_img = _tokenizer_digest(llm.dir), tokenizer_token_id(llm.dir, IMG_CONTEXT)
    for role, src in (("vision", vision), ("connector", connector)):
        if src is None or src.dir == llm.dir or src.adapter.name == "internvit":
            continue
        digest = _tokenizer_digest(src.dir)
        if digest and llm_digest and digest != llm_digest:
            notes.append(f"tokenizer mismatch: {role} source {src.dir} has tokenizer {digest}, LLM source {llm.dir} has {llm_digest}")
        if _vocab_of(src) is not None and _vocab_of(src) != _vocab_of(llm):
            notes.append(f"vocab size mismatch: {role} source {src.dir} has {_vocab_of(src)}, LLM source has {_vocab_of(llm)}")
        src_img = src.model_dict.get("image_token_id")
        if src_img is not None and llm_img is not None and src_img != llm_img:
            notes.append(f"{IMG_CONTEXT} id differs: {src_img} in {src.dir}, {llm_img} in the LLM's tokenizer (using {llm_img})")
    if llm_digest is None:
        notes.append(f"LLM source {llm.dir} has no tokenizer.json; the checkpoint records no tokenizer")
    return notes


def assemble_model_dict(vision: Source | None, connector: Source | None, llm: Source,
                        image_token_id: int | None = None, fresh_connector: bool = False) -> dict:
    """vision from one checkpoint, connector from another (or freshly initialised), LLM from a third."""
    md = {"llm": llm.model_dict["llm"], "params_dtype": llm.model_dict.get("params_dtype", "float32")}
    if vision is None:
        md["text_only"] = True
        md["image_token_id"] = llm.model_dict.get("image_token_id", 0)
        return md
    md["vision"] = vision.model_dict["vision"]
    proj_src = connector if connector is not None else vision
    md["projector"] = proj_src.model_dict.get("projector", {"downsample_ratio": 0.5})
    if image_token_id is None:
        image_token_id = tokenizer_token_id(llm.dir, IMG_CONTEXT)
    if image_token_id is None and "image_token_id" in llm.model_dict and not llm.model_dict.get("text_only"):
        image_token_id = llm.model_dict["image_token_id"]
    if image_token_id is None:
        raise CheckpointError(
            f"the LLM source {llm.dir} has no {IMG_CONTEXT} token in its tokenizer; add it to the tokenizer "
            "(and resize the embeddings) or pass --image-token-id"
        )
    md["image_token_id"] = int(image_token_id)
    if not fresh_connector and connector is not None:
        _check_connector_fits(connector, md)
    return md


def _check_connector_fits(connector: Source, md: dict) -> None:
    c = connector.model_dict
    want = (md["vision"]["hidden_size"], md["llm"]["hidden_size"], md["projector"]["downsample_ratio"])
    have = (c["vision"]["hidden_size"], c["llm"]["hidden_size"], c["projector"]["downsample_ratio"])
    if want != have:
        raise CheckpointError(
            f"connector from {connector.dir} maps vision width {have[0]} -> LLM width {have[1]} (ratio {have[2]}), "
            f"but the assembled model needs {want[0]} -> {want[1]} (ratio {want[2]}); use --connector init "
            "to start a fresh connector"
        )


def unread_tensors(sources: dict[str, Source | None], mcfg) -> dict[Path, list[str]]:
    """Per source directory, the HF tensors of the parts taken from it that no mapping reads.

    A checkpoint is converted whole: a tensor nothing reads means config.json describes another model than the
    weights (a vision_config that leaves out qk_normalization while the file has q/k norms, a tied config with
    an lm_head) or the file holds something we do not model. Exempt: the encoder blocks after select_layer (not
    built, documented) and, for a source only some parts are taken from (`assemble`), the other parts' tensors.
    """
    taken: dict[Path, tuple[Source, list[str]]] = {}
    for part, src in sources.items():
        if src is not None and part in src.adapter.parts:
            taken.setdefault(src.dir, (src, []))[1].append(part)
    out = {}
    for d, (src, parts) in taken.items():
        layout = src.adapter.parts
        read = {n for part in parts for g in src.adapter.groups(mcfg, parts=[part]) for m in g.maps for n in m.hf}
        if "vision" in parts:  # blocks after select_layer
            prefix, style = layout["vision"]
            for i in range(num_layers("vision", mcfg), mcfg.vision.num_layers):
                read.update(n for m in mappings("vision", prefix, style, mcfg, i) for n in m.hf)
        ours = tuple(layout[p][0] for p in parts)
        others = tuple(layout[p][0] for p in layout if p not in parts)
        unread = [n for n in src.reader.keys()
                  if n not in read and (n.startswith(ours) or not (others and n.startswith(others)))]
        if unread:
            out[d] = sorted(unread)
    return out


def check_all_read(sources: dict[str, Source | None], mcfg) -> None:
    for d, names in unread_tensors(sources, mcfg).items():
        hint = ""
        if mcfg.llm.tie_embeddings and any(n.endswith("lm_head.weight") for n in names):
            hint = (" config.json ties the output layer to the embedding but the file has an lm_head: set "
                    "tie_word_embeddings false if it is a trained output layer, or drop it from the file.")
        raise CheckpointError(
            f"{d}: {len(names)} tensor(s) would be left unread: {names[:5]}{' ...' if len(names) > 5 else ''}. "
            "config.json does not describe them (e.g. a vision_config without qk_normalization is read as true, "
            "as InternVL does; an explicit false with q/k norm weights in the file is a contradiction) or they belong "
            f"to no part of the model; fix config.json so that every weight is used.{hint}"
        )


def recipe_differences(src: Source, recipe_model) -> list[str]:
    """The model fields a recipe sets otherwise than the HF checkpoint it would train (`check-recipe`).

    Only the parts the checkpoint holds are compared (an LLM-only checkpoint checks model.llm.*); fields that
    are not architecture (freeze, params_dtype, transformer_impl, padded_num_heads) are skipped.
    """
    from engine.checkpoint.mcore_io import FREE_FIELDS
    from engine.config.base import from_dict, to_dict
    from engine.config.model import ModelConfig

    hf, ours = to_dict(from_dict(ModelConfig, src.model_dict)), to_dict(recipe_model)
    parts = [p for p in ("vision", "projector", "llm") if p in src.adapter.parts]
    pairs = [(f"model.{p}.{k}", v, ours[p].get(k)) for p in parts for k, v in hf[p].items()]
    if len(parts) == 3:  # a whole VLM: its image token too
        pairs.append(("model.image_token_id", hf["image_token_id"], ours["image_token_id"]))
    return [f"{key}: checkpoint {a!r}, recipe {b!r}" for key, a, b in pairs
            if key.split(".")[-1] not in FREE_FIELDS and a != b]


# ------------------------------------------------------------------------------------ output handling


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (symlinks resolved).

    The output is replaced at the end (with --force) and its `<out>.partial` / `<out>.replaced` siblings are
    removed while writing, so an overlap would delete what the command is still reading: `mcore-to-hf --out
    <its --ckpt> --force` used to replace its own source. `inputs`: role (for the message) -> path.
    """
    out = Path(out)
    written = {out: "is", out.parent / f"{out.name}.partial": "stages in",
               out.parent / f"{out.name}.replaced": "swaps through"}
    for role, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        for target, verb in written.items():
            dst = target.resolve()
            if src == dst:
                how = f"{verb} the {role} {path}"
            elif src.is_relative_to(dst):
                how = f"{verb} {dst}, which contains the {role} {path}"
            elif dst.is_relative_to(src):
                how = f"{verb} {dst}, inside the {role} {path}"
            else:
                continue
            if str(src) != str(path):
                how += f" (= {src})"
            raise CheckpointError(
                f"--out {out} {how}: writing it would delete what this command reads; choose an output directory "
                "outside every input"
            )



def _progress(items, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not show, file=sys.stderr, dynamic_ncols=True)


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (which /proc/self/clear_refs can restart), else getrusage.

    (getrusage's ru_maxrss also keeps the peak recorded whenever a thread exited, so after a restart it can
    still report an earlier peak, e.g. one from the imports.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------- hf -> mcore


def _stage_needs(model) -> dict[str, str]:
    """Full names of this stage's parameters -> the full tensor that fills it (tied output: embedding)."""
    from engine.parallel.full_state import global_param_name

    needs = {}
    for name, _ in model.named_parameters():
        key = global_param_name(name, model)
        if key == "llm.output_layer.weight" and model.share_embeddings_and_output_weights:
            needs[key] = "llm.embedding.word_embeddings.weight"
        else:
            needs[key] = key
    return needs


def load_sources_into(model, sources: dict[str, Source | None], mcfg, tp_group, show_progress: bool = False) -> None:
    """Fill this rank's shards from HF sources, one group at a time. `sources[part] = None`: keep init."""
    from engine.parallel.full_state import load_full_state

    check_all_read(sources, mcfg)
    needs = _stage_needs(model)
    wanted = set(needs.values())
    filled: set[str] = set()
    plan = []
    for part, src in sources.items():
        if src is None or part not in src.adapter.parts:
            continue
        for group in src.adapter.groups(mcfg, parts=[part]):
            maps = [m for m in group.maps if m.ours in wanted]
            if maps:
                plan.append((src, group, maps))
    for src, group, maps in _progress(plan, "hf -> mcore", show_progress):
        sub = type(group)(group.part, group.layer, tuple(maps))
        full = src.adapter.from_hf(lambda n, ours, r=src.reader: r.get(n, ours), mcfg, sub)
        extra = {k: v for k, v in needs.items() if v in full and k != v}  # tied output layer
        load_full_state(model, {**full, **{k: full[v] for k, v in extra.items()}}, tp_group, strict=False)
        filled.update(full)
    skipped_parts = {p for p, s in sources.items() if s is None}
    missing = sorted(v for v in wanted - filled if v.split(".")[0] not in skipped_parts)
    if missing:
        raise CheckpointError(f"no HF tensors were found for {missing[:5]}{'...' if len(missing) > 5 else ''}")


def _fresh_tensors(mcfg, pg, sources: dict[str, Source | None]) -> dict:
    """Freshly initialised full tensors for the parts given no source (`assemble --connector init`)."""
    fresh = [part for part, src in sources.items() if src is None]
    if not fresh:
        return {}
    if fresh != ["projector"]:
        raise CheckpointError(f"only the connector can start from a fresh initialisation; no source for {fresh}")
    from engine.config.base import to_dict
    from engine.model.projector import Projector
    from engine.model.specs import backend_for
    from engine.model.transformer_configs import vision_transformer_config

    cfg1 = engine_config(to_dict(mcfg), 1, 1)  # full (TP=1) tensors, like the meta model's
    projector = Projector(vision_transformer_config(mcfg, cfg1.parallel), mcfg.projector, mcfg.vision.hidden_size,
                          mcfg.llm.hidden_size, backend_for(mcfg.transformer_impl), tp_group=pg.tp)
    return {f"projector.{n}": t.detach().cpu() for n, t in projector.named_parameters()}


def plan_hf_to_mcore(sources: dict[str, Source | None], mcfg, tp: int, pg, max_piece_bytes: int = MAX_PIECE_BYTES):
    """What hf_to_mcore writes, checked against the HF files before anything is written.

    Returns (layout, produce): the pieces of megatron's tensors and the function that reads one.
    """
    from engine.checkpoint.mcore_io import build_meta_model

    check_all_read(sources, mcfg)
    hf = HFRows(sources, mcfg)
    fresh = _fresh_tensors(mcfg, pg, sources)
    vocab = {n: (mcfg.llm.vocab_size, mcfg.llm.padded_vocab_size(tp)) for n in VOCAB_PARAM_NAMES}
    model = build_meta_model(mcfg, pg)  # TP=1/PP=1 on the meta device: keys, shapes, dtypes only
    layout = build_layout(model.sharded_state_dict(), vocab_rows=vocab, max_piece_bytes=max_piece_bytes,
                          sliceable=lambda n: n in fresh or (n in hf and hf.sliceable(n)))
    del model
    missing = sorted(n for n in layout.shapes if n not in hf and n not in fresh)
    if missing:
        raise CheckpointError(f"no HF tensors were found for {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, shape in layout.shapes.items():
        if name in hf:
            hf.check(name, shape)

    def produce(piece):
        a, b = piece.rows
        if piece.name in fresh:
            return fresh[piece.name][a:b] if fresh[piece.name].dim() else fresh[piece.name]
        return hf.rows(piece.name, a, b)

    return layout, produce


def hf_to_mcore(sources: dict[str, Source | None], model_dict: dict, out: str | Path, *, tp: int, pp: int,
                force: bool = False, step: int = 0, show_progress: bool = True,
                max_piece_bytes: int = MAX_PIECE_BYTES) -> dict:
    """HF source(s) -> a dist checkpoint for TP x PP, streamed piece by piece (engine/checkpoint/lazy_save.py).

    Runs in one process or under torchrun with any number of processes (they share the reading and
    writing). `tp` / `pp` choose what the checkpoint records and how it pads (vocab rows to a multiple of
    make_vocab_size_divisible_by x TP, ViT heads to a multiple TP divides); it loads at any TP/PP.
    """
    from engine.config.parallel import ParallelConfig
    from engine.parallel.init import initialize

    parts_of: dict[Path, list[str]] = {}
    for part, src in sources.items():
        if src is not None:
            parts_of.setdefault(src.dir, []).append(part)
    refuse_overlap(out, {f"source of the {'/'.join(parts)}": d for d, parts in parts_of.items()})
    if is_nonempty(Path(out)) and not force:  # fail before building anything
        raise CheckpointError(f"output {out} exists and is not empty; pass --force to replace it")
    check_model_dict(model_dict, "converted config")
    cfg = engine_config(model_dict, tp, pp)  # validates the config for TP x PP and pads ViT heads for TP
    pg = initialize(ParallelConfig(), seed=cfg.train.seed)  # TP=1/PP=1 over however many processes run
    layout, produce = plan_hf_to_mcore(sources, cfg.model, tp, pg, max_piece_bytes)
    llm_src = sources["llm"]
    with atomic_output_dir(out, force) as tmp:
        from tqdm import tqdm

        bar = tqdm(total=layout.nbytes, desc="hf -> mcore", unit="B", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, disable=not (show_progress and rank() == 0))
        with bar:
            save_pieces(layout, tmp, produce, on_written=bar.update)
        if rank() == 0:
            aux = tmp / TOKENIZER_SUBDIR
            aux.mkdir()
            copied = copy_aux_files(llm_src.dir, aux)
            if sources.get("vision") is not None:  # image processor config comes with the vision side
                copy_aux_files(sources["vision"].dir, aux, [n for n in ("preprocessor_config.json", "processor_config.json",
                                                           "video_preprocessor_config.json") if n not in copied])
            single = {s.dir for s in sources.values() if s is not None}
            hf_cfg = llm_src.hf_config if len(single) == 1 else None
            write_meta(
                tmp, cfg.model, step=step, tokenizer_path=TOKENIZER_SUBDIR if "tokenizer.json" in copied or
                "tokenizer_config.json" in copied else None, tp=tp, pp=pp, hf_config=hf_cfg,
                hf_layout=llm_src.adapter.name if hf_cfg else None,
                sources={p: (str(s.dir) if s is not None else "init") for p, s in sources.items()},
            )
    groups = layout.group_bytes()
    return {"peak_rss_bytes": peak_rss_bytes(), "weights_bytes": layout.nbytes,
            "largest_group_bytes": max(groups.values()), "largest_group": max(groups, key=groups.get),
            "largest_piece_bytes": max(p.nbytes for p in layout.pieces), "pieces": len(layout.pieces)}


# ---------------------------------------------------------------------------------------- mcore -> hf


def mcore_to_hf(ckpt: str | Path, out: str | Path, layout: str, *, force: bool = False,
                max_shard_bytes: int = 2 << 30, show_progress: bool = True) -> dict:
    """Single process. Streams the dist checkpoint group by group into HF safetensors shards. `ckpt`: a dist
    checkpoint dir, or a training run dir / its `checkpoints/latest` or `checkpoints/best` pointer."""
    from engine.config.parallel import ParallelConfig
    from engine.parallel.init import initialize
    from engine.train.checkpointing import resolve_checkpoint

    if layout not in ADAPTERS:
        raise CheckpointError(f"--layout {layout!r}: choose one of {sorted(ADAPTERS)}")
    adapter = ADAPTERS[layout]
    given = ckpt
    try:
        ckpt = resolve_checkpoint(ckpt)
    except FileNotFoundError as e:
        if Path(ckpt).is_file():  # a latest/best pointer naming a missing checkpoint
            raise CheckpointError(str(e)) from None
        # otherwise not a training run: read_meta below says what is missing
    refuse_overlap(out, {"--ckpt": given, "checkpoint": ckpt})
    meta = read_meta(ckpt)
    if meta.get("tokenizer_path"):  # a training checkpoint's is the run's data.tokenizer_path (absolute)
        refuse_overlap(out, {"tokenizer directory": Path(ckpt) / meta["tokenizer_path"]})
    mcfg = meta["model_config"]
    if mcfg.text_only and "vision" in adapter.parts:
        raise CheckpointError(f"{ckpt} holds a text-only model; export it with --layout qwen2")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        pg = initialize(ParallelConfig(), seed=0)
    else:
        raise CheckpointError("mcore-to-hf runs in one process; launch it without torchrun")
    reader = GroupReader(ckpt, pg)
    dtype = torch_dtype(mcfg.params_dtype)
    largest_group = 0
    with atomic_output_dir(out, force) as tmp:
        writer = HFWriter(tmp, max_shard_bytes)
        for group in _progress(adapter.groups(mcfg), "mcore -> hf", show_progress):
            ours = reader.read([m.ours for m in group.maps])
            largest_group = max(largest_group, sum(t.numel() * t.element_size() for t in ours.values()))
            for name, t in adapter.to_hf(ours, mcfg, group).items():
                writer.add(name, t.to(dtype))  # megatron keeps norms in fp32 in a bf16 model; HF: one dtype
            del ours
        writer.close()
        base = meta.get("hf_config") if meta.get("hf_layout") == layout else None
        hf_cfg = adapter.config_to_hf(mcfg, base)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for name, data in adapter.extra_files(hf_cfg).items():  # chat layout: its configuration_*.py
            (tmp / name).write_bytes(data)
        if meta.get("tokenizer_path"):  # relative to the checkpoint (ours) or absolute (a training run's)
            copy_aux_files(Path(ckpt) / meta["tokenizer_path"], tmp, AUX_FILES)
    notes = adapter.export_notes(Path(out), hf_cfg)
    for note in notes:
        print(f"WARNING: {note}", file=sys.stderr)
    return {"peak_rss_bytes": peak_rss_bytes(), "weights_bytes": writer.total_bytes, "largest_group_bytes": largest_group,
            "notes": notes}


__all__ = [
    "Source", "assemble_model_dict", "atomic_output_dir", "check_all_read", "engine_config", "hf_to_mcore",
    "load_sources_into", "recipe_differences", "unread_tensors",
    "mcore_to_hf", "open_source", "peak_rss_bytes", "read_meta", "refuse_overlap", "tokenizer_report",
]
