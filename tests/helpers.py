"""What several test files share: tokenizers and tiny models built offline, the in-process engine, example makers,
the DeepSpeed launcher of the demo run, and the README's measured tables. Imported as `from helpers import ...`
(pytest puts tests/ on sys.path); no test file imports another test file."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from clo_fast.config import DataConfig, LoraSettings, QualitySettings, RunConfig, load_config
from clo_fast.constants import IGNORE_INDEX
from clo_fast.data import demo_data_path
from clo_fast.model import add_lora_adapters, apply_lora_trainable, build_policy


# ---------------------------------------------------------------------------------------------------------- tokenizers
def make_bpe_tokenizer(texts, *, vocab_size, special_tokens, unk_token=None, chat_template=None):
    """A tiny byte-level BPE tokenizer trained offline on `texts`, with a BOS prefix like Llama's.

    special_tokens must contain "<s>" (BOS), "</s>" (EOS) and "<pad>"; their order fixes their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    extra = {"unk_token": unk_token} if unk_token else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **extra)
    if chat_template:
        fast.chat_template = chat_template
    return fast


# ---------------------------------------------------------------------------------------- the README's measured tables
README = Path(__file__).resolve().parent.parent / "README.md"


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of the markdown tables in `markdown`: {first cell: the other cells}."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[1]) <= set("-:"):
            rows[cells[0]] = cells[1:]
    return rows


def readme_table(header: str) -> dict[str, list[str]]:
    """The README table that starts with the line `header`."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(header) :]
    return table_rows(block[: block.index("\n\n")])


LOCK = Path(__file__).resolve().parent.parent / "requirements" / "cpu.txt"
PINNED = ("transformers", "deepspeed")  # with torch (installed first, its release in scripts/lock.sh): the README's


def locked_versions() -> dict[str, str]:
    """{package: version} of the lock the README and CI install (requirements/cpu.txt, `bash scripts/lock.sh`)."""
    import re

    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def locked_torch() -> str:
    """The torch release scripts/lock.sh resolves the lock against (torch itself is installed first)."""
    import re

    text = (LOCK.parent.parent / "scripts" / "lock.sh").read_text()
    return re.search(r"^TORCH_CPU=([\d.]+)", text, re.M).group(1)


def require_locked_versions() -> None:
    """The README's measured tables hold for the locked versions. Installed from the lock, this passes; with other
    versions it fails naming them — except under scripts/check_latest.sh (CLO_FAST_UNLOCKED=1), which installs the
    newest releases on purpose and skips with the reason."""
    import deepspeed
    import transformers

    want = {"torch": locked_torch(), **{k: locked_versions()[k] for k in PINNED}}
    have = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__}  # fmt: skip
    if have != want:
        msg = f"the README's tables were measured with the locked versions {want}; installed {have}"
        if os.environ.get("CLO_FAST_UNLOCKED") == "1":
            pytest.skip(msg + " (scripts/check_latest.sh: the newest releases)")
        raise AssertionError(msg + ": install requirements/cpu.txt (README), or re-measure and re-lock")


# ----------------------------------------------------------------- the launched demo run (deepspeed clo_fast/train.py)
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "clo_fast" / "train.py"
DEMO = ROOT / "configs" / "demo.yaml"
STEPS = 12
LAUNCH_TIMEOUT = 300


def have_deepspeed_launcher():
    return shutil.which("deepspeed") is not None


def launch(out: Path, cache: Path, *, ranks=2, extra=(), env=None, resume=False, short=True):
    """deepspeed --num_gpus <ranks> clo_fast/train.py --config configs/demo.yaml (+ test overrides; short=False:
    the demo config as it is, only its folders moved)."""
    sets = {
        "train.output_dir": str(out / "run"),
        "data.output_dir": str(out / "data"),
        "data.cache_dir": str(cache),
        "eval.output_dir": str(out / "eval"),
    }
    if short:
        sets |= {"optim.max_steps": STEPS, "train.save_steps": 4, "train.eval_steps": 4, "train.save_total_limit": 3}
    for kv in extra:
        k, v = kv.split("=", 1)
        sets[k] = v
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(TRAIN), "--config", str(DEMO)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    if resume:
        cmd += ["--resume"]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    e.pop("TRITON_INTERPRET", None)  # conftest sets it for the kernel tests; the trainer uses the torch head on CPU
    log = out / "launch.log"
    with open(log, "w") as f, open(out / "launch.err", "w") as ferr:
        rc = subprocess.run(
            cmd, cwd=ROOT, env=e, stdout=f, stderr=ferr, stdin=subprocess.DEVNULL, timeout=LAUNCH_TIMEOUT
        ).returncode
    return subprocess.CompletedProcess(cmd, rc, log.read_text(), (out / "launch.err").read_text())


def fault_env(event: str, step: int) -> dict[str, str]:
    """Environment that makes a training run (train.py, or each run of compare) break at `step`: the fault
    callback of tests/fault_callbacks.py, registered from outside (events listed there)."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    return {
        "CLO_FAST_CALLBACKS": "fault_callbacks:Faults",
        "CLO_FAST_TEST_FAULT": f"{event}:{step}",
        "PYTHONPATH": path,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run: Path) -> dict[int, dict]:
    """step -> merged record (train metrics and eval metrics logged at the same step)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


# ------------------------------ in-process training: a tiny Llama, tokenized CLO examples, DeepSpeed's engine contract
VOCAB, PAD = 61, 0


class InProcessEngine:
    """DeepSpeed's engine contract without DeepSpeed: backward divides by the accumulation steps (as
    DeepSpeed does); step() would update at the boundary, and is a no-op here so gradients can be read."""

    def __init__(self, module, accumulation_steps: int):
        self.module, self.accumulation_steps = module, accumulation_steps

    def __call__(self, *batch):  # (input_ids, attention_mask, labels) or (PackedBatch,)
        return self.module(*batch)

    def backward(self, loss):
        (loss / self.accumulation_steps).backward()

    def step(self):
        pass


def tiny_llama_config(**overrides):
    """The tests' tiny Llama shape (2 layers, hidden 32, 4 heads, 2 KV heads, untied head; 64 tokens unless
    overridden)."""
    shape = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    return LlamaConfig(**{**shape, **overrides})


def tiny_model(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, pad_token_id=PAD, initializer_range=0.2))


def tiny_llama_folder(path: Path) -> Path:
    """A tiny Llama model with a word-level tokenizer of 64 tokens, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(63)} | {"<unk>": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="t2").save_pretrained(path)
    return path


def trained_adapter(base: Path, path: Path) -> Path:
    """A LoRA adapter of `base` (q/v projections, B != 0 as after training), saved to `path`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # an adapter that has trained: B != 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


def examples(n, seed=1):
    """Tokenized CLO examples (4 sequences each, labels unshifted, IGNORE_INDEX on the prompt) with ref_logps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids4, lab4 = [], []
        for _ in range(4):
            p, r = (int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g)))
            ids = torch.randint(1, VOCAB, (p + r,), generator=g).tolist()
            ids4.append(ids)
            lab4.append([IGNORE_INDEX] * p + ids[p:])
        ref = (-30 * torch.rand(4, generator=g) - 5).tolist()
        out.append({"input_ids": ids4, "labels": lab4, "ref_logps": ref})
    return out


# ----------------------------------- evaluation: a tokenizer with a chat template, a tiny Llama for it, an eval config
CORPUS = [
    "Explain why the sky is blue in simple words.",
    "The sky looks blue because air scatters blue light more than red light.",
    "Write a short poem about the sea and the wind.",
    "Give me three tips for learning a new language quickly.",
    "하늘이 왜 파란지 쉬운 말로 설명해 주세요.",
    "공기가 빨간빛보다 파란빛을 더 많이 흩뜨리기 때문에 하늘이 파랗게 보입니다.",
    "바다와 바람에 대한 짧은 시를 써 주세요.",
    "새로운 언어를 빨리 배우는 세 가지 방법을 알려 주세요.",
    "### Instruction:\n\n### Response:\n",
] * 4


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


ROWS = [
    {
        "id": "a",
        "prompt_en": "Explain why the sky is blue.",
        "response_en": "Air scatters blue light more than red light.",
        "prompt_tgt": "하늘이 왜 파란지 설명해 주세요.",
        "response_tgt": "공기가 파란빛을 더 많이 흩뜨립니다.",
        "target_lang": "ko",
    },
    {
        "id": "b",
        "prompt_en": "Write a short poem about the sea.",
        "response_en": "The sea and the wind sing together.",
        "prompt_tgt": "바다에 대한 짧은 시를 써 주세요.",
        "response_tgt": "바다와 바람이 함께 노래합니다.",
        "target_lang": "ko",
    },
    {
        "id": "c",
        "prompt_en": "Give me three tips for learning a new language quickly, please.",
        "response_en": "Practice every day.",
        "prompt_tgt": "새로운 언어를 빨리 배우는 방법을 알려 주세요.",
        "response_tgt": "매일 연습하세요. 그리고 많이 들으세요.",
        "target_lang": "ko",
    },
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with EOS = id 0 (the `mute` model relies on it) and a chat template."""
    return make_bpe_tokenizer(
        CORPUS, vocab_size=420, special_tokens=["</s>", "<s>", "<pad>"], chat_template=CHAT_TEMPLATE
    )


def make_model(tok, seed=0, mute=False) -> LlamaForCausalLM:
    cfg = tiny_llama_config(
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if mute:  # final norm 0 -> all logits 0 -> greedy picks id 0, which is EOS: every response is empty
        assert tok.eos_token_id == 0
        with torch.no_grad():
            model.model.norm.weight.zero_()
    return model.eval()


def make_cfg(tmp_path, **eval_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.target_lang = "ko"
    cfg.data.max_length = 128
    cfg.eval.max_new_tokens = 6
    cfg.eval.batch_size = 2
    cfg.eval.output_dir = str(tmp_path / "eval")
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


# ------------------------------------------------------------------------------------------------ LoRA and run configs
CPU = torch.device("cpu")


def lora_policy(lora=None, tied=False, seed=0):
    hf = tiny_model(seed)
    if tied:
        hf.config.tie_word_embeddings = True
        hf.lm_head.weight = hf.model.embed_tokens.weight
    add_lora_adapters(hf, lora or LoraSettings(r=4, alpha=8.0, dropout=0.0))
    policy = build_policy(hf, head_impl="torch")
    info = apply_lora_trainable(policy)
    return hf, policy, info


def full_logits_logps(hf_model, batch) -> torch.Tensor:
    """Independent: materialized logits in float64, Σ log-softmax at the labels (labels already aligned)."""
    with torch.no_grad():
        logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    picked = torch.gather(logp, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def run_config(tmp_path, **overrides) -> RunConfig:
    sets = {"train.output_dir": str(tmp_path / "run"), "data.target_lang": "sw", **overrides}
    return load_config(None, sets)


# ---------------- chat templates, data configs, tiny models of other families, a cached fake translator, conversations
TEXTS = [
    "Explain why the sky is blue.",
    "The sky looks blue because air scatters short wavelengths more.",
    "Eleza kwa nini anga ni la buluu.",
    "Anga linaonekana la buluu kwa sababu hewa hutawanya mawimbi mafupi zaidi.",
] * 4


# Qwen2.5-like ChatML: adds an English system prompt of its own when the conversation has none
CHATML = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% set rest = messages[1:] %}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% set rest = messages %}"
    "{% endif %}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Llama-3-like: BOS in the template, turns closed by <|eot_id|>, EOS is a different token
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def data_config(tmp_path, **kw):
    base = {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"), "target_lang": "sw"}
    # the toy translations are copies ("[sw] Hi"), which the gate would drop (tests/test_data_quality.py)
    base["quality"] = QualitySettings(enabled=False)
    return DataConfig(**{**base, **kw})


def token_ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def save_tiny_model(tmp_path, config_cls_name, model_cls_name, name, **extra):
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls_name)(**{**TINY, **extra})
    model = getattr(transformers, model_cls_name)(config)
    out = tmp_path / name
    model.save_pretrained(out)
    return out


class SlowCachedTranslator:
    """A stand-in for HFTranslator: the shared sqlite cache in front of a slow "model" that tags texts."""

    name = "slow-fake"

    def __init__(self, cache_path, seconds_per_text=0.0):
        from clo_fast.data.translate import TranslationCache

        self.cache = TranslationCache(cache_path)
        self.seconds_per_text = seconds_per_text
        self.translated: list[str] = []  # texts this process ran through the "model"

    def translate(self, texts):
        done = self.cache.get_many(self.name, "en", "sw", texts)
        todo = [t for t in dict.fromkeys(texts) if t not in done]
        for t in todo:
            time.sleep(self.seconds_per_text)
            done[t] = f"[sw] {t}"
        self.cache.put_many(self.name, "en", "sw", [(t, done[t]) for t in todo])
        self.translated += todo
        return [done[t] for t in texts]

    def translate_pairs(self, pairs, src, tgt):
        out = self.translate([p.instruction for p in pairs] + [p.response for p in pairs])
        return list(zip(out[: len(pairs)], out[len(pairs) :], strict=True))


CONVERSATIONS = [
    {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "You answer about weather."},
            {"role": "user", "content": "Is it raining?"},
            {"role": "assistant", "content": "Yes, lightly."},
            {"role": "user", "content": "Should I take an umbrella?"},
            {"role": "assistant", "content": "Yes, take a small one."},
        ],
    },
    {
        "id": "single",
        "messages": [
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
        ],
    },
]


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_tiny_m2m(d: Path) -> str:
    """A tiny randomly initialised M2M100 + its sentencepiece tokenizer (trained on the demo's texts), saved with
    save_pretrained into d/model; returns that folder."""
    import sentencepiece as spm
    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    rows = [json.loads(line) for line in demo_data_path().read_text(encoding="utf-8").splitlines()]
    texts = [r[k] for r in rows for k in ("instruction", "response", "instruction_sw", "response_sw")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=300,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    (d / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    tok = M2M100Tokenizer(str(d / "vocab.json"), str(d / "sentencepiece.bpe.model"), src_lang="en", tgt_lang="sw")
    torch.manual_seed(0)
    cfg = M2M100Config(
        vocab_size=max(tok.lang_code_to_id.values()) + 1,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    model_dir = d / "model"
    M2M100ForConditionalGeneration(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return str(model_dir)


# ------------------------------------------------------------------------------------------------------- GGUF files
def _to_llama_cpp_order(w, n_head: int):
    """llama.cpp stores Llama's q/k rows with each head's two rotary halves interleaved: row (h, i, j) of the HF
    layout [head, half j, i] goes to [head, i, half j]. transformers undoes this when it reads a GGUF file."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, tok, *, name: str = "tiny-llama") -> Path:
    """`model` (a LlamaForCausalLM) and `tok` (a byte-level BPE fast tokenizer) as one float32 GGUF file, written
    with the gguf package's writer: the llama architecture's keys, the tokenizer as tokens + merges ("gpt2"
    model, as SmolLM2's file has it) and its chat template, the tensors under llama.cpp's names."""
    import json as _json

    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(cfg.vocab_size)), "the tokenizer's ids must be 0..V-1"
    special = set(tok.all_special_ids)
    merges = _json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)  # as the tokenizer: a BOS before every text
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(
            f"blk.{i}.attn_q.weight", _to_llama_cpp_order(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight", _to_llama_cpp_order(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
        for hf, cpp in names.items():
            w.add_tensor(f"blk.{i}.{cpp}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
