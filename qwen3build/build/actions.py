"""What the doit tasks do: hash the weights, make each artifact (or find it in the cache),
and publish the whole stack. dodo.py only wires these to task names.

Statuses (per artifact, in artifacts/.state/<id>.json with the run that set them):
"rebuilt" (built by this run), "restored" (this run took it from the cache: found there
by its task, or published from there), otherwise "up to date".
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

from ..checkpoint.digests import DigestStore, stat_signature
from ..errors import BuildError
from ..paths import STACK_FILE
from . import keys, lock, publish, workers
from .cache import TMP_MARK, ActionCache, owner_name, remove_path, sweep_orphans, tree_size
from .declare import COREAI_FOLDER, Declarations
from .faults import crash_point
from .keys import digest_json
from .memory import current_rss, peak_rss, reset_peak_rss
from .plan import AIMODEL, IO_MODEL, SAMPLER, Plan

log = logging.getLogger(__name__)

RUN_ID_ENV = "QWEN3BUILD_RUN_ID"
WORK_MARK = ".work-"


def run_id() -> str:
    return os.environ.setdefault(RUN_ID_ENV, uuid.uuid4().hex)


class Builder:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.tree = plan.tree
        self.cache = ActionCache(self.tree.cache_dir)
        self._declarations: Declarations | None = None
        keys.use_disk_cache(self.tree.cache_dir / "code_facts.json")

    # ------------------------------------------------------------ the lock
    def lock(self) -> None:
        """Hold the tree lock (first call waits for another build, then sweeps)."""
        lock.acquire(self.tree.lock_path, sweep=self.sweep)

    def sweep(self) -> None:
        removed = (self.cache.sweep() + publish.sweep(self.tree) + sweep_orphans([self.tree.tmp_dir], WORK_MARK)
                   + sweep_orphans([self.tree.state_dir], TMP_MARK))
        if removed:
            log.info("swept %d leftover(s) of interrupted builds", len(removed))

    # ------------------------------------------------------------ state records
    def state_path(self, artifact: str) -> Path:
        return self.tree.state_dir / f"{artifact.replace(':', '__')}.json"

    def read_state(self, artifact: str) -> dict:
        try:
            return json.loads(self.state_path(artifact).read_text())
        except (OSError, ValueError):
            return {}

    def write_state(self, artifact: str, record: dict) -> None:
        write_json(self.state_path(artifact), {**record, "run_id": run_id()})

    # ------------------------------------------------------------ weights
    def weights_uptodate(self) -> bool:
        self.lock()
        try:
            manifest = json.loads(self.tree.manifest_path.read_text())
        except (OSError, ValueError):
            return False
        return manifest.get("stat") == stat_signature(self.plan.stat_inputs)

    def weights(self) -> None:
        """Per-tensor digests of the checkpoint (hashing only files whose stat changed)."""
        self.lock()
        started = time.perf_counter()
        plan = self.plan
        checkpoint = plan.checkpoint  # validates names, shapes and dtypes against config.json
        store = DigestStore(self.tree.stat_db)
        try:
            digests = {}
            for path in plan.weight_files:
                digests.update(store.file_digests(checkpoint, path))
        finally:
            store.close()
        manifest = {"stat": stat_signature(plan.stat_inputs), "tensors": dict(sorted(digests.items()))}
        crash_point("weights:hashed")
        write_json(self.tree.manifest_path, manifest)
        self._declarations = None  # declarations read the manifest
        self.write_state("weights", {"status": "rebuilt", "bytes_hashed": store.bytes_hashed,
                                     "seconds": round(time.perf_counter() - started, 3)})
        log.info("weights: %d tensors, %.1f MB hashed", len(digests), store.bytes_hashed / 1e6)

    # ------------------------------------------------------------ declarations
    @property
    def declarations(self) -> Declarations:
        if self._declarations is None:
            try:
                manifest = json.loads(self.tree.manifest_path.read_text())
            except (OSError, ValueError):
                raise LookupError("the weights manifest is not built yet") from None
            self._declarations = Declarations(self.plan, self.cache, manifest)
        return self._declarations

    def key(self, artifact: str) -> str | None:
        """The artifact's key now, or None when an input is not built yet."""
        try:
            return self.declarations.declare(artifact).key
        except LookupError:
            return None

    # ------------------------------------------------------------ one artifact
    def uptodate(self, artifact: str) -> bool:
        """doit's check: the cache holds an entry for the artifact's current key (cheap)."""
        self.lock()
        key = self.key(artifact)
        return key is not None and self.cache.has(key)

    def ensure(self, artifact: str) -> dict:
        """The verified cache entry's meta for the artifact's key, building it if needed."""
        self.lock()
        declared = self.declarations.declare(artifact)
        started = time.perf_counter()
        meta = self.cache.open(declared.key, artifact)
        if meta is not None:
            self.write_state(artifact, {**_summary(meta), "status": "restored", "key": declared.key,
                                        "seconds": round(time.perf_counter() - started, 3)})
            return meta
        meta = self._build(declared)
        self.write_state(artifact, {**_summary(meta), "status": "rebuilt", "key": declared.key,
                                    "seconds": round(time.perf_counter() - started, 3)})
        log.info("%s: rebuilt in %.2fs (%s)", artifact, time.perf_counter() - started, declared.key[:12])
        return meta

    def _build(self, declared) -> dict:
        upstream = {}
        for name, up in declared.upstream.items():
            meta = self.cache.open(up.key, up.artifact)
            if meta is None or meta["digests"].get(up.output) != up.digest:
                raise BuildError(f"{declared.artifact}: its input {up.artifact} is missing from the cache; "
                                 f"run `doit {up.artifact}` (or the whole build) again")
            upstream[name] = self.cache.output_path(up.key, up.output)
        from .inputs import BuildInputs, DeclaredTensors, frozen  # numpy: not on the no-op path
        started = time.perf_counter()
        staging = self.cache.staging(declared.key)
        self.tree.tmp_dir.mkdir(parents=True, exist_ok=True)
        scratch = self.tree.tmp_dir / f"{declared.artifact.replace(':', '__')}{owner_name(WORK_MARK)}"
        scratch.mkdir()
        workers.in_flight.update((staging, scratch))
        try:
            inputs = BuildInputs(artifact=declared.artifact, values=frozen(declared.values),
                                 tensors=DeclaredTensors(self.plan.checkpoint, declared.tensors, declared.artifact),
                                 files=declared.files, upstream=upstream, scratch=scratch)
            outputs = {name: staging / "out" / name for name in declared.outputs}
            reset_peak_rss()
            start_rss = current_rss()
            # Library temporaries (coremltools converts into a temporary .mlpackage and
            # removes it only at exit, which a doit worker never reaches) go to the
            # scratch folder: removed below, and swept after a kill like the rest of it.
            tempdir, tempfile.tempdir = tempfile.tempdir, str(scratch)
            try:
                extra = self.run_body(declared.module, inputs, outputs)
            except RuntimeError as exc:
                # coremltools' weight writer reports a full disk as a bare RuntimeError.
                if "FileWriter" not in str(exc):
                    raise
                raise BuildError(f"{staging}: coremltools could not write the package ({str(exc).strip()}); the "
                                 "disk may be full: free space (`qwen3build cache gc --max-size 10G`) or point "
                                 "CACHE_DIR elsewhere") from None
            finally:
                tempfile.tempdir = tempdir
            crash_point("artifact:built")
            missing = [name for name, path in outputs.items() if not path.exists()]
            if missing:
                raise RuntimeError(f"{declared.module}.build did not write {', '.join(missing)}")
            meta = {"artifact": declared.artifact, "outputs": list(declared.outputs),
                    "build_seconds": round(time.perf_counter() - started, 3), "peak_rss": peak_rss(),
                    "start_rss": start_rss,
                    "bytes": sum(tree_size(p) for p in outputs.values()), "extra": extra}
            return self.cache.store(declared.key, staging, meta)
        except BaseException:
            remove_path(staging)
            raise
        finally:
            remove_path(scratch)
            workers.in_flight.difference_update((staging, scratch))

    @staticmethod
    def run_body(module_name: str, inputs, outputs: dict) -> dict:
        """Import the artifact's build module and call its build(inputs, outputs): all the
        code that runs here must be in the key (tests/test_keys.py traces it)."""
        return importlib.import_module(module_name).build(inputs, outputs) or {}

    # ------------------------------------------------------------ the stack
    def stack_description(self) -> dict:
        """stack.json without its "files" (which come from the cache entries)."""
        from ..graph.decoder import io_functions, shard_functions  # numpy: not on the no-op path
        plan = self.plan
        settings = plan.settings
        tokenizer = settings.CONFIG.with_name("tokenizer.json")
        depth = plan.config.num_hidden_layers
        return {
            "format": 2,
            "model": plan.config.to_dict(),
            "seq_len": settings.SEQ_LEN,
            "recipe": settings.RECIPE,
            "quantization": {"layers": {str(layer): plan.allocation(layer) for layer in range(depth)},
                             "group_size": plan.recipe.group_size, "embed_bits": plan.recipe.embed_bits,
                             "embed_block_size": plan.recipe.embed_block_size},
            "palettize_masks": settings.PALETTIZE_MASKS,
            "kv_write": settings.KV_WRITE,
            "prefill_len": settings.PREFILL_LEN,
            "io_model": f"{IO_MODEL}.mlpackage",
            "sampler": f"{SAMPLER}.mlpackage",
            "shards": [{"name": s.name, "package": f"{s.package_name}.mlpackage", "first": s.first,
                        "last": s.last, "role": s.role} for s in plan.layout],
            "compute_units": {f"{IO_MODEL}.mlpackage": "CPU_AND_GPU", f"{SAMPLER}.mlpackage": "CPU_AND_GPU",
                              **{f"{s.package_name}.mlpackage": "CPU_AND_NE" for s in plan.layout}},
            # Each package's functions, its default first (docs/prefill.md).
            "functions": {f"{IO_MODEL}.mlpackage": list(io_functions(settings.PREFILL_LEN)),
                          **{f"{s.package_name}.mlpackage": list(shard_functions(settings.PREFILL_LEN))
                             for s in plan.layout},
                          f"{SAMPLER}.mlpackage": ["main"]},
            # The build's inputs, for the torch backend and verify (absolute: this machine's).
            "checkpoint_config": str(settings.CONFIG),
            "weights": {"files": [str(f) for f in plan.weight_files],
                        "index": str(plan.weight_index) if plan.weight_index else None},
            "tokenizer": str(tokenizer) if tokenizer.is_file() else None,
            "scales": "../numerics/slanc_scales.npy",
            "quant": "../quant",
            "formats": list(settings.FORMATS),
        }

    def publish(self) -> dict:
        """Publish the whole stack as one generation; returns {artifact: status}."""
        self.lock()
        declarations = self.declarations
        ids = self.plan.artifact_ids()
        metas = {artifact: self.ensure_quiet(artifact) for artifact in ids}
        keys = {artifact: declarations.declare(artifact).key for artifact in ids}
        description = self.stack_description()
        generation_id = digest_json({"keys": keys, "stack": description})[:20]
        current = publish.current_generation(self.tree)
        current_record = publish.read_generation(current) if current else None
        if current_record and current_record.get("id") == generation_id \
                and publish.generation_intact(current, current_record) and publish.links_point_to(self.tree, current):
            return {artifact: "up to date" for artifact in ids}
        target = publish.find_generation(self.tree, generation_id)
        if target is not None:
            # Going back to the generation kept from before: swap the links, copy nothing.
            publish.swap_links(self.tree, target)
            statuses = {}
            for artifact in ids:
                self.cache.touch(keys[artifact])
                if (current_record or {}).get("artifacts", {}).get(artifact) == keys[artifact]:
                    statuses[artifact] = self._status(artifact, keys[artifact])
                else:
                    self.write_state(artifact, {**_summary(metas[artifact]), "status": "restored",
                                                "key": keys[artifact], "seconds": 0.0})
                    statuses[artifact] = "restored"
            publish.prune_generations(self.tree, target)
            log.info("published generation %s again (kept from an earlier build: links swapped)", generation_id)
            return statuses
        statuses = {}
        writer = publish.GenerationWriter(self.tree, generation_id)
        try:
            stack_files = {}
            for artifact in ids:
                declared = declarations.declare(artifact)
                reused = self._reuse(writer, current, current_record, artifact, declared.key, declared)
                meta = metas[artifact]
                if not reused:
                    meta = self._publish_from_cache(writer, artifact, declared)
                    state = self.read_state(artifact)
                    if not (state.get("run_id") == run_id() and state.get("key") == declared.key):
                        self.write_state(artifact, {**_summary(meta), "status": "restored", "key": declared.key,
                                                    "seconds": 0.0})
                statuses[artifact] = self._status(artifact, declared.key)
                for output, folder in zip(declared.outputs, declared.publish):
                    if folder == "packages":
                        stack_files[output] = meta["files"][output]
                    elif folder == COREAI_FOLDER and output.endswith(".aimodel"):
                        stack_files[f"../{folder}/{output}"] = meta["files"][output]
            stack = {**description, "keys": keys, "files": stack_files}
            if "coreai" in self.plan.settings.FORMATS:
                stack["coreai"] = coreai_section(self.plan, metas)
            writer.add_text(f"packages/{STACK_FILE}", json.dumps(stack, indent=1, sort_keys=True))
            generation = writer.commit({"id": generation_id, "artifacts": keys})
        except BaseException:
            writer.abandon()
            raise
        publish.prune_generations(self.tree, generation)
        ways = ", ".join(f"{n} {how}" for how, n in sorted(writer.ways.items()))
        log.info("published generation %s (%s files: %s)", generation_id, len(writer.files), ways or "none")
        return statuses

    def ensure_quiet(self, artifact: str) -> dict:
        """The artifact's cache meta: from the cache (cheap check; publishing verifies) or built."""
        key = self.declarations.declare(artifact).key
        if self.cache.has(key):
            return self.cache.read_meta(key)
        return self.ensure(artifact)

    def _reuse(self, writer, current, record, artifact, key, declared) -> bool:
        """Link an unchanged artifact's files from the current generation, if intact."""
        if not current or not record or record.get("artifacts", {}).get(artifact) != key:
            return False
        files = {}
        for output, folder in zip(declared.outputs, declared.publish):
            prefix = f"{folder}/{output}"
            found = {rel: rec for rel, rec in record["files"].items() if rel == prefix or rel.startswith(prefix + "/")}
            if not found or not all(publish.file_intact(current / rel, rec) for rel, rec in found.items()):
                return False
            files.update(found)
        writer.add_from_generation(current, "", files)
        return True

    def _publish_from_cache(self, writer, artifact, declared) -> dict:
        for attempt in (1, 2):
            meta = self.cache.read_meta(declared.key)
            try:
                if meta is None:
                    raise publish.DamagedSource(self.cache.entry(declared.key), "missing")
                for output, folder in zip(declared.outputs, declared.publish):
                    writer.add_from_cache(self.cache.output_path(declared.key, output), f"{folder}/{output}",
                                          meta["files"][output])
                self.cache.touch(declared.key)
                return meta
            except publish.DamagedSource as damage:
                if attempt == 2:
                    raise BuildError(f"{artifact}: rebuilt cache entry is damaged again ({damage}); "
                                     f"check the disk under {self.tree.cache_dir}") from None
                self.cache.quarantine(declared.key, f"{artifact}: {damage}")
                self.ensure(artifact)
        raise AssertionError("unreachable")

    def _status(self, artifact: str, key: str) -> str:
        state = self.read_state(artifact)
        if state.get("run_id") == run_id() and state.get("key") == key:
            return state["status"]
        return "up to date"


def coreai_section(plan: Plan, metas: dict) -> dict:
    """stack.json's "coreai" section (stack.Stack.coreai): the .aimodel paths relative to
    stack.json, each one's functions (default first) and each shard's states, as built."""
    def path(artifact):
        return f"../{COREAI_FOLDER}/{metas[artifact]['outputs'][0]}"

    ids = plan.aimodel_ids()
    shards = [f"{AIMODEL}:shard:{spec.name}" for spec in plan.layout]
    return {"io_model": path(f"{AIMODEL}:{IO_MODEL}"), "sampler": path(f"{AIMODEL}:{SAMPLER}"),
            "shards": [path(artifact) for artifact in shards],
            "functions": {path(artifact): metas[artifact]["extra"]["functions"] for artifact in ids},
            "states": {path(artifact): metas[artifact]["extra"]["states"] for artifact in shards}}


def _summary(meta: dict) -> dict:
    """What a state record keeps of a cache entry's meta: its build's own figures and size."""
    return {**meta.get("extra", {}), "bytes": meta.get("bytes"), "build_seconds": meta.get("build_seconds"),
            "peak_rss": meta.get("peak_rss"), "start_rss": meta.get("start_rss")}


def write_json(path: Path, obj: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    text = json.dumps(obj, indent=1, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}{owner_name(TMP_MARK)}")  # swept if we die before the rename
    tmp.write_text(text)
    os.replace(tmp, path)
