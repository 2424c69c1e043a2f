"""Prepared samples cached on disk (prepare.py, cache.py): the cache changes no batch, is the same
whoever prepared it, resumes, and is keyed by what shapes the samples."""

import collections
import itertools
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from covenant_jax.data import cache, pipeline, prepare
from covenant_jax.errors import CacheError
from tests.data import common

SEQ = 32


def _chat_file(path, n=120, bad_every=37):
    """Chat rows of varied lengths (some over SEQ), a broken line every `bad_every` rows."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                "{not json\n"
                if i % bad_every == 5
                else json.dumps(common.chat_row(i, n_user=1 + (i * 7) % 25, n_asst=1 + (i * 5) % 13)) + "\n"
            )
    return str(path)


def _text_file(path, n=30):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": common.words(i, 3 + (i * 11) % 70)}) + "\n")
    return str(path)


def _cfg(tmp_path, **kw):
    sources = [
        {"path": _chat_file(tmp_path / "chat.jsonl"), "weight": 2.0},
        {"path": _text_file(tmp_path / "docs.jsonl"), "format": "text"},
        {"dataset": [common.chat_row(1000 + i) for i in range(10)]},  # In memory: never cached.
    ]
    return dict(
        sources=sources,
        template="chatml",
        seq_len=SEQ,
        batch_size=4,
        epochs=1,
        eval_fraction=0.2,
        overlength="split",
        shard_rows=16,
        workers=1,
        **kw,
    )


def _build(cfg, cache_dir=None, index=0, count=1):
    return pipeline.build_pipeline(
        cfg, common.word_tokenizer(), process_index=index, process_count=count, cache_dir=cache_dir
    )


def _assert_same_batches(a, b, at_least=4):
    n = 0
    for x, y in itertools.zip_longest(a, b):
        assert x is not None and y is not None, "as many batches"
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        n += 1
    assert n >= at_least


def _files(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in sorted(os.listdir(folder))}


def test_cached_batches_equal_uncached_bit_for_bit(tmp_path):
    cfg = _cfg(tmp_path)
    memory = _build(cfg)
    cold = _build(cfg, tmp_path / "cache")
    warm = _build(cfg, tmp_path / "cache")
    assert memory.cache_locations == [None, None, None]
    assert cold.cache_locations == warm.cache_locations and cold.cache_locations[2] is None
    assert all(os.path.exists(os.path.join(p, cache.MANIFEST)) for p in cold.cache_locations[:2])
    assert len(os.listdir(cold.cache_locations[0])) == 2 * 8 + 2  # 120 rows: 8 shards of 16
    for built in (cold, warm):
        _assert_same_batches(memory.train, built.train)
        _assert_same_batches(memory.eval, built.eval)
        assert str(built.report) == str(memory.report)
    chat = memory.report.sources[0]
    assert chat.skipped["invalid_json"] == 4 and chat.split > 0 and chat.eval > 0
    assert f"{tmp_path / 'chat.jsonl'}:6" in str(memory.report)  # the first bad line, located

    it = iter(warm.train)  # the iterator state (exact resume) is unchanged by the cache
    next(it), next(it)
    state, want = it.get_state(), [next(it) for _ in range(3)]
    again = iter(_build(cfg, tmp_path / "cache").train)
    again.set_state(state)
    _assert_same_batches(want, [next(again) for _ in range(3)], at_least=3)


def test_two_processes_preparing_halves_equal_one_preparing_all(tmp_path):
    """Process 1 of 2 writes only its shards (and cannot load before process 0 completes the
    entries); then process 0 writes the rest and joins them: every file equals the one process's,
    and so do both processes' batches and the report."""
    cfg = _cfg(tmp_path)
    one = _build(cfg, tmp_path / "one")
    with pytest.raises(CacheError, match="incomplete"):
        _build(cfg, tmp_path / "two", index=1, count=2)
    first = os.path.join(tmp_path / "two", os.path.basename(one.cache_locations[0]))
    written = sorted(p for p in os.listdir(first) if p.endswith(".json"))
    assert written == [f"shard-{s:05d}.json" for s in (1, 3, 5, 7)]  # shard s -> process s % 2
    two = [_build(cfg, tmp_path / "two", index=i, count=2) for i in (0, 1)]
    for mine, theirs in zip(one.cache_locations[:2], two[0].cache_locations[:2]):
        assert os.path.basename(mine) == os.path.basename(theirs)
        assert _files(mine) == _files(theirs)
    for i in (0, 1):
        reference = _build(cfg, index=i, count=2)  # in memory, every row in this process
        _assert_same_batches(reference.train, two[i].train)
        _assert_same_batches(reference.eval, two[i].eval)
        assert str(two[i].report) == str(one.report) == str(reference.report)


def test_an_unshared_cache_folder_is_named(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(CacheError, match="shard 1 is missing.*storage all hosts share"):
        _build(cfg, tmp_path / "cache", index=0, count=2)


def test_preparation_resumes_at_the_missing_shards(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    with pytest.raises(CacheError):
        _build(cfg, tmp_path / "cache", index=1, count=2)  # a job stopped after half the shards
    rows = collections.Counter()
    real = prepare.Worker.samples

    def counting(self, how, task_rows):
        rows[how.fmt.format] += len(task_rows)
        return real(self, how, task_rows)

    monkeypatch.setattr(prepare.Worker, "samples", counting)
    resumed = _build(cfg, tmp_path / "cache")
    # chat: shards 0, 2, 4, 6 of 0..7; docs (30 rows): shard 1, its last 14 rows (source 1's
    # shard s goes to process (s + 1) % 2: process 1 had written shard 0); the in-memory source.
    assert rows == {"messages": 4 * 16 + 10, "text": 14}
    monkeypatch.setattr(prepare.Worker, "samples", real)
    _assert_same_batches(_build(cfg).train, resumed.train)


def test_the_key_follows_what_shapes_the_samples(tmp_path):
    cfg = _cfg(tmp_path)
    where = _build(cfg, tmp_path / "cache").cache_locations[:2]
    same = dict(
        cfg, batch_size=8, seed=3, eval_fraction=0.1, epochs=2, packing_bins=3, eval_mode="trainer", workers=2
    )
    assert _build(same, tmp_path / "cache").cache_locations[:2] == where
    assert _build(dict(cfg, seq_len=SEQ + 1), tmp_path / "cache").cache_locations[0] != where[0]
    chat = tmp_path / "chat.jsonl"
    os.utime(chat, ns=(os.stat(chat).st_atime_ns, os.stat(chat).st_mtime_ns + 10**9))
    assert _build(cfg, tmp_path / "cache").cache_locations[:2] == where  # content, not mtime
    with open(chat, "a") as f:
        f.write(json.dumps(common.chat_row(7)) + "\n")
    changed = _build(cfg, tmp_path / "cache").cache_locations[:2]
    assert changed[0] != where[0] and changed[1] == where[1]  # only the changed file's entry
    renamed = dict(cfg, sources=[dict(cfg["sources"][0], weight=1.0, name="chats")] + cfg["sources"][1:])
    assert _build(renamed, tmp_path / "cache").cache_locations[0] == changed[0]
    own_template = [dict(cfg["sources"][0], template="chatml")] + cfg["sources"][1:]
    own = dict(cfg, template="llama3", sources=own_template)
    assert _build(own, tmp_path / "cache").cache_locations[:2] == changed  # the same templates
    # What changes a conversation's tokens or mask changes its entry (the template: only its).
    moved = _build(dict(cfg, template="llama3"), tmp_path / "cache").cache_locations[:2]
    assert moved[0] != changed[0] and moved[1] == changed[1]
    for change in (
        dict(roles_to_train=["user", "assistant"]),
        dict(train_on_eos="none"),
        dict(role_order="any"),
        dict(loss_on="all"),
    ):
        assert _build(dict(cfg, **change), tmp_path / "cache").cache_locations[0] != changed[0], change


def test_processes_prepare_like_one(tmp_path, monkeypatch):
    """Two spawned preparation processes give the samples one process gives, in order."""
    cfg = dict(_cfg(tmp_path), sources=[{"path": _chat_file(tmp_path / "c.jsonl", n=3 * prepare.TASK_ROWS)}])
    one = _build(cfg)
    started = []
    monkeypatch.setattr(
        prepare.Pool,
        "_start",
        lambda self, real=prepare.Pool._start: started.append(self.processes) or real(self),
    )
    monkeypatch.setattr(prepare, "SPAWN_AFTER_S", 0.0)  # Helpers from the first task on.
    two = _build(dict(cfg, workers=2))
    assert started and started[0] == 2
    _assert_same_batches(one.train, two.train)
    assert str(one.report) == str(two.report)


def _worker():
    """A Worker for plain text and chatml rows (word tokenizer, seq_len SEQ)."""
    return prepare.Worker.create(
        common.word_tokenizer(), [{}], dict(template="chatml", loss_on="assistant",
        roles_to_train=["assistant"], train_on_eos="turn", seq_len=SEQ, overlength="split"),
    )  # fmt: skip


def test_this_process_prepares_every_task_until_helpers_pay_off(monkeypatch):
    """A source cheaper than SPAWN_AFTER_S starts no process (each costs seconds of start-up);
    once helpers run, this process still prepares every `processes`-th task itself, its
    tokenizer on one thread as theirs."""
    worker = _worker()
    how = prepare.reading({"format": "text"}, {"template": "chatml", "role_order": "any"})
    tasks = [(i, how, [(f"t:{i}", {"text": common.words(i, 9)})]) for i in range(7)]
    local, threads = [], set()  # Tasks prepared here; TOKENIZERS_PARALLELISM meanwhile.
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(
        prepare.Worker,
        "samples",
        lambda self, h, rows, real=prepare.Worker.samples: (
            local.append(rows[0][0])
            or threads.add(os.environ.get("TOKENIZERS_PARALLELISM"))
            or real(self, h, rows)
        ),
    )
    with prepare.Pool(worker, processes=3) as pool:
        assert [m for m, _ in pool.map(tasks)] == list(range(7))
        assert pool._executor is None and len(local) == 7 and threads == {None}
    monkeypatch.setattr(prepare, "SPAWN_AFTER_S", 0.0)
    local.clear(), threads.clear()
    with prepare.Pool(worker, processes=2) as pool:
        got = [(m, s.tokens.tolist()) for m, s in pool.map(tasks)]
        assert pool._executor._max_workers == 1
    assert local == ["t:0", "t:2", "t:4", "t:6"]
    assert threads == {"false"} and "TOKENIZERS_PARALLELISM" not in os.environ  # One thread, restored.
    assert got == [(m, s.tokens.tolist()) for m, s in prepare.Pool(worker, 1).map(tasks)]


def test_auto_workers_leaves_busy_cores_alone(monkeypatch):
    """data.workers=0: one process per core that the 1-minute load average leaves idle (this
    process's own core counted idle), at least one; an explicit count is kept."""
    monkeypatch.setattr(prepare, "_usable_cores", lambda: 8)
    for load, want in ((0.0, 8), (1.0, 8), (4.2, 5), (8.0, 1), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert prepare.auto_workers(0) == want, load
    assert prepare.auto_workers(3) == 3


def test_preparation_processes_import_neither_jax_nor_grain():
    """What a spawned process loads to get its Worker: the tokenizer side, not JAX or Grain
    (seconds of imports in each process, for nothing)."""
    worker = _worker()
    code = (
        "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
        "print(sorted(m for m in ('jax', 'grain', 'flax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(worker), capture_output=True, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )  # fmt: skip
    assert out.stdout.decode().strip() == "[]"


def test_data_prepare_verb_fills_the_cache_training_reads(tmp_path, capsys, monkeypatch):
    from covenant_jax import cli
    from covenant_jax.train import loop

    model = tmp_path / "model"
    common.word_tokenizer().save_pretrained(model)  # all `data prepare` reads of the model
    data = _chat_file(tmp_path / "chat.jsonl")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "from pathlib import Path\nfrom tests.train import common\n\ndef get_config():\n"
        f"    c = common.tiny_recipe(Path({str(tmp_path)!r}), Path({str(model)!r}), Path({data!r}))\n"
        "    c.data.template = 'chatml'\n    return c\n"
    )
    assert cli.main(["data", "prepare", str(recipe), "--config.data.workers=1"]) == 0
    out = capsys.readouterr().out
    cfg = cli.load_recipe(str(recipe), [])
    where = os.path.join(loop.data_cache_dir(cfg), os.listdir(loop.data_cache_dir(cfg))[0])
    assert "data report:" in out and "skipped 4 (invalid_json=4)" in out and f"cached in {where}" in out

    def no_work(*_):
        raise AssertionError("training prepared again")

    monkeypatch.setattr(prepare.Worker, "samples", no_work)  # the run reads the cache
    data = pipeline.build_pipeline(
        cfg.data,
        common.word_tokenizer(),
        process_index=0,
        process_count=1,
        cache_dir=loop.data_cache_dir(cfg),
    )
    assert data.cache_locations == [where] and str(data.report) in out


def test_a_cache_on_an_object_store_is_read_through_one_local_copy(tmp_path):
    from covenant_jax import storage
    from tests import gcs_emulator

    cfg = _cfg(tmp_path)
    with gcs_emulator.gcs_server(("bucket",)) as url:
        saved = dict(os.environ)
        os.environ.update(gcs_emulator.client_env(url))
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        try:
            remote = [
                pipeline.build_pipeline(
                    cfg,
                    common.word_tokenizer(),
                    process_index=0,
                    process_count=1,
                    cache_dir="gs://bucket/cache",
                    local_cache_dir=str(tmp_path / "local"),
                )
                for _ in range(2)
            ]  # cold (written to the bucket), then warm
            assert remote[0].cache_locations[0].startswith("gs://bucket/cache/chat-")
            assert storage.path(remote[0].cache_locations[0] + "/" + cache.MANIFEST).exists()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    copies = sorted(os.listdir(tmp_path / "local" / "covenant-data-cache"))
    assert len(copies) == 2 and not [c for c in copies if c.startswith(".")]  # one per entry, whole
    memory = _build(cfg)
    for r in remote:
        _assert_same_batches(memory.train, r.train)
        assert str(r.report) == str(memory.report)


def test_every_row_format_and_template_setting_goes_through_the_cache(tmp_path):
    """CSV with a BOM, instruct rows with axolotl's format strings and no chat template, a
    source with its own template, and the mask settings: cached (2 processes, 2 workers)
    == prepared in memory, skips located the same (`file:line: reason`)."""
    csv_path = tmp_path / "rows.csv"
    lines = ["instruction,input,output"] + [
        f"{common.words(i, 3)},{common.words(i + 50, i % 3)},{common.words(i + 90, 2 + i % 5)}"
        for i in range(40)]  # fmt: skip
    lines[7] = "a,b,c,EXTRA"  # line 8: invalid_csv
    csv_path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    chats = _chat_file(tmp_path / "chat.jsonl", n=40, bad_every=13)
    prompt = {"format": "Q: {instruction} ({input})", "no_input_format": "Q: {instruction}",
              "system_prompt": "Be brief."}  # fmt: skip
    cfg = dict(
        sources=[{"path": str(csv_path), "format": "instruct", "template": "none",
                  "prompt_format": prompt},
                 {"path": chats, "template": "llama3"}, {"path": chats}],
        template="chatml", seq_len=SEQ, batch_size=4, epochs=1, eval_fraction=0.2,
        overlength="split", shard_rows=8, roles_to_train=["user", "assistant"],
        train_on_eos="last", role_order="any",
    )  # fmt: skip
    memory = _build(dict(cfg, workers=1))
    with pytest.raises(CacheError):
        _build(dict(cfg, workers=2), tmp_path / "cache", index=1, count=2)
    cached = _build(dict(cfg, workers=2), tmp_path / "cache")
    _assert_same_batches(memory.train, cached.train)
    _assert_same_batches(memory.eval, cached.eval)
    assert str(cached.report) == str(memory.report)
    report = memory.report.sources
    assert report[0].located["invalid_csv"] == [f"{csv_path}:8: invalid_csv (4 cells, the header has 3)"]
    assert report[1].located["invalid_json"][0].startswith(f"{chats}:6: invalid_json (")
    assert report[1].trained_tokens != report[2].trained_tokens  # llama3 vs chatml markers


def _model_folder(root, name="model"):
    folder = root / name
    (folder / "params" / "d").mkdir(parents=True)
    for f, data in [
        ("config.json", b"{}"),
        ("model.safetensors", b"w" * 8),
        ("tokenizer.json", b"{}"),
        ("params/d/0", b"p"),
    ]:
        (folder / f).write_bytes(data)
    return folder


def _identity_with_gcs(folder):
    """folder_identity of a copy of ``folder`` in an emulated bucket."""
    from covenant_jax import storage
    from tests import gcs_emulator

    with gcs_emulator.gcs_server(("bucket",)) as url:
        saved = dict(os.environ)
        os.environ.update(gcs_emulator.client_env(url))
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        try:
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                storage.copy_file(f, storage.path(f"gs://bucket/m/{f.relative_to(folder)}"))
            return cache.folder_identity("gs://bucket/m")
        finally:
            os.environ.clear()
            os.environ.update(saved)


def test_a_model_folders_identity_follows_its_config_and_weights_not_its_tokenizer(tmp_path):
    """What keys DPO's cached reference log-probs: rewritten weights or config (new mtime or
    size), another folder's weights -> another identity; tokenizer files (their tokens are keyed
    separately) -> the same; a converted folder's Orbax files count as weights."""
    folder = _model_folder(tmp_path)
    first = cache.folder_identity(folder)
    assert sorted(first) == ["config.json", "model.safetensors", "params/d/0"]
    os.utime(folder / "tokenizer.json", ns=(1, 1))
    assert cache.folder_identity(folder) == first
    for f in ("model.safetensors", "params/d/0", "config.json"):
        stat = os.stat(folder / f)
        os.utime(folder / f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
        assert cache.folder_identity(folder) != first, f
        first = cache.folder_identity(folder)
    other = _model_folder(tmp_path, "other")
    (other / "model.safetensors").write_bytes(b"v" * 9)
    assert cache.folder_identity(other) != first

    # In a bucket: the store's checksum or generation, read from the listing.
    same_size = _model_folder(tmp_path, "same_size")
    (same_size / "model.safetensors").write_bytes(b"v" * 8)
    remote = _identity_with_gcs(folder)
    assert sorted(remote) == sorted(first) and remote["model.safetensors"]["size"] == 8
    assert remote["model.safetensors"] != _identity_with_gcs(same_size)["model.safetensors"]
