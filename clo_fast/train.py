"""CLO training under DeepSpeed ZeRO-3 on the fused LM head: the launched script, wiring only.

    deepspeed --num_gpus 8 clo_fast/train.py --config configs/llama3_8b_sw.yaml
    deepspeed --num_gpus 2 clo_fast/train.py --config configs/demo.yaml              # CPU: 2 gloo ranks
    deepspeed ... clo_fast/train.py --config <run>.yaml --resume [TAG]               # continue (latest by default)
    deepspeed ... clo_fast/train.py --config <run>.yaml --set optim.max_steps=20 --set clo.beta=0.2

Read top to bottom: config → data → tokenizer → tokenized data → model/engine → reference log-probs → loop
→ checkpoints → HF export → optional evaluation. Each piece lives in `clo_fast.training` (one job per module).
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts clo_fast/ itself at sys.path[0]: drop it so nothing in it (data/, evaluate/)
# can shadow a top-level module. clo_fast itself comes from the installed project (`pip install -e .`).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from clo_fast import numerics  # first: importing clo_fast pins the CPU numerics before torch is (numerics.py)

# isort: split
import argparse
import json
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from clo_fast.atomic import OutputDirError
from clo_fast.cli import add_train_arguments
from clo_fast.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_args_with_overrides,
    to_dict,
)
from clo_fast.data import build_text_dataset, tokenize_dataset
from clo_fast.data.build import translate_sharded
from clo_fast.data.sources import DataError
from clo_fast.data.split import require_examples
from clo_fast.data.translate import TranslationError
from clo_fast.evaluate import evaluate_models
from clo_fast.evaluate.probe import FidelityProbe
from clo_fast.model import load_policy
from clo_fast.pretrained import load_tokenizer, resolve_model_path_without_collective
from clo_fast.training import distributed as dist
from clo_fast.training.batches import MicroBatcher, check_vocab_range, resolve_packing
from clo_fast.training.callbacks import ENV_VAR as CALLBACKS_ENV_VAR
from clo_fast.training.callbacks import Callbacks, parse_specs
from clo_fast.training.checkpoint import (
    check_resume_progress,
    checkpoint_root,
    load_checkpoint,
    prepare_output_dir,
    prepare_resume,
    save_checkpoint,
    write_run_record,
)
from clo_fast.training.distributed import barrier, log0, rank, world_size
from clo_fast.training.ds_config import build_ds_config
from clo_fast.training.export import add_evaluation_to_card, export_hf
from clo_fast.training.metrics import EnglishGuard, MetricsSink, StepLog, format_metrics
from clo_fast.training.optim import build_optimizer
from clo_fast.training.preflight import check_environment, check_head_device
from clo_fast.training.reference import with_reference_logps
from clo_fast.training.sampler import StepSampler, check_global_batch
from clo_fast.training.scoring import held_out_loss
from clo_fast.training.step import LossSetup, NonFiniteError, NonFiniteGuard, name_languages, train_step

# deepspeed and transformers (seconds to import) are imported where first used, so a config error fails at once

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per step
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)  # shared with `clo-fast train`, which lists them in its --help
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the launcher
    return parse_args_with_overrides(p, argv)  # --set, and sweep tools' --section.field=VALUE


class Run:
    """One training run's state, built in order by `main`: the stages below read like a recipe."""

    def __init__(self, cfg: RunConfig, config_path: Path, resume: str | None, resume_unverified=False, callbacks=()):
        self.cfg, self.config_path, self.resume = cfg, config_path, resume
        self.resume_unverified = resume_unverified
        self.resume_point = None
        self.callbacks = Callbacks(callbacks)  # imported now: a wrong path fails before any work

    def setup(self) -> None:
        t = self.cfg.train
        check_environment(self.cfg, self.config_path)
        dist.check_launch()  # before WORLD_SIZE is read: a launcher that started fewer processes than asked
        self.ds_config = build_ds_config(self.cfg, self.config_path, int(os.environ.get("WORLD_SIZE", "1")))
        self.device = dist.init_process_group(t.dist_timeout_s)
        check_head_device(self.cfg, self.config_path, self.device)
        dist.set_seed(self.cfg.optim.seed)
        self.loss_setup = LossSetup.from_config(self.cfg.clo)
        self.out_dir = Path(t.output_dir)
        # refuses a folder that is not ours or holds checkpoints (without --resume); locks it
        self.lock = dist.rank0_checked(lambda: prepare_output_dir(self.cfg, self.resume))
        dist.check_shared_output_dir(self.out_dir)
        if self.resume:  # verified and checked against this config now, not after data, model and reference pass
            self.resume_point = prepare_resume(self.cfg, self.resume, allow_unverified=self.resume_unverified)
            if self.cfg.optim.max_steps:  # the total is known now (with optim.epochs only after the data stage)
                folder, state, _ = self.resume_point
                check_resume_progress(state, self.cfg.optim.max_steps, folder)
        # config.yaml (the run's record of how it was trained) is written by `record`, once the run is accepted
        c = self.cfg.clo
        dist.log0(
            f"{dist.world_size()} rank(s) on {self.device.type} ({torch.distributed.get_backend()}); "
            f"mode {c.mode}, λ={self.loss_setup.lam}, β={c.beta}; {numerics.summary_line()}"
        )

    def data(self) -> None:
        """Text dataset, tokenizer, tokenized splits, batch order. No collective here (a rank waiting in one
        times out while another translates or builds): the ranks translate shards through the shared cache,
        then each builds and tokenizes (caches written atomically, first writer wins)."""
        cfg, o = self.cfg, self.cfg.optim
        translator = translate_sharded(cfg.data, rank(), world_size(), progress=rank() == 0)
        texts, self.data_summary = build_text_dataset(cfg.data, translator=translator, progress=rank() == 0)
        del translator  # a translation model on the GPU: freed before the policy loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.eval_records = [dict(r) for r in texts["eval"].select(range(min(len(texts["eval"]), 4 * 64)))]
        self.model_path = resolve_model_path_without_collective(
            cfg.model.name_or_path, cfg.data.cache_dir, rank(), gguf_file=cfg.model.gguf_file
        )
        self.tokenizer = load_tokenizer(self.model_path)
        self.train_ds = tokenize_dataset(texts["train"], self.tokenizer, cfg.data)
        self.eval_ds = None
        if len(texts["eval"]):
            self.eval_ds = tokenize_dataset(texts["eval"], self.tokenizer, cfg.data)
        for split, ds in (("train", self.train_ds), ("eval", self.eval_ds)):
            if ds is not None:  # every prompt too long: a clear error, not an IndexError later
                why = f"all {len(texts[split])} prompts are longer than data.max_length ({cfg.data.max_length} tokens)"
                require_examples(split, len(ds), why)
        packing = resolve_packing(
            cfg.train.packing,
            cfg.model.attn_implementation,
            self.device.type,
            f"{cfg.where('train.packing', str(self.config_path))}: train.packing",
        )
        self.collate = MicroBatcher(
            packing, self.tokenizer.pad_token_id, cfg.train.pad_to_multiple_of, cfg.data.target_langs
        )
        self.sampler = StepSampler(
            len(self.train_ds), o.micro_batch_examples, o.gradient_accumulation_steps, world_size(), o.seed
        )
        check_global_batch(self.sampler, cfg, str(self.config_path))
        self.total_steps = o.max_steps or o.epochs * self.sampler.steps_per_epoch
        if self.resume_point is not None:
            folder, state, _ = self.resume_point
            check_resume_progress(state, self.total_steps, folder)
        n_eval = len(self.eval_ds) if self.eval_ds else 0
        log0(
            f"data: {len(self.train_ds)} train / {n_eval} eval examples; global batch {self.sampler.global_batch} "
            f"examples; {self.sampler.steps_per_epoch} steps/epoch; {self.total_steps} steps; packing {packing}"
        )
        self.record()

    def record(self) -> None:
        """The run is accepted (every start-up check passed, a resume has steps left): only now is the run folder
        written to, so a refused start changes nothing on disk."""
        if rank() == 0:
            write_run_record(self.out_dir, self.cfg, self.data_summary)

    def model(self) -> None:
        """ZeRO-3 partitioned while loading, frozen but for trainable_patterns, fused head; the engine; the
        reference log-probs (the engine still holds the starting weights); resume."""
        import deepspeed

        cfg = self.cfg
        policy, info, _, self._keepalive = load_policy(
            cfg.model, ds_config=self.ds_config, head_impl=cfg.train.head_impl, cache_dir=cfg.data.cache_dir
        )
        log0(
            f"model {self.model_path}: {info.trainable / 1e6:.2f}M of {info.total / 1e6:.2f}M parameters train "
            f"({len(info.names)} tensors, e.g. {info.names[0]})"
        )
        optimizer, scheduler = build_optimizer(policy, cfg.optim, self.total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        if self.loss_setup.use_reference:
            args = (self.engine, self.collate, cfg, self.model_path, self.device)
            self.train_ds = with_reference_logps(self.train_ds, "train", *args)
            if self.eval_ds is not None:
                self.eval_ds = with_reference_logps(self.eval_ds, "eval", *args)
        self.step = load_checkpoint(self.engine, cfg, self.resume, prepared=self.resume_point) if self.resume else 0
        self.fidelity = None
        if cfg.train.fidelity_prompts and self.eval_records:
            self.fidelity = FidelityProbe(cfg, self.tokenizer, self.eval_records)

    def evaluate_loss(self, step: int) -> None:
        m = held_out_loss(
            self.engine, self.eval_ds, self.collate, self.cfg.optim.micro_batch_examples, self.device, self.loss_setup
        )
        if self.fidelity is not None:
            m.update(self.fidelity(self.engine.module))
        self.english_guard.observe(step, m)
        self.sink.write(step, m)
        self.last_metrics.update({k: v for k, v in m.items() if not isinstance(v, str)})

    def train(self) -> None:
        cfg, t, o, engine = self.cfg, self.cfg.train, self.cfg.optim, self.engine
        self.sink, self.last_metrics = MetricsSink(cfg, self.step), {}
        self.english_guard = EnglishGuard(t.english_nll_warn, o.lr, dist.warn0)
        if self.eval_ds is not None and t.eval_steps > 0 and self.step == 0:
            self.evaluate_loss(0)
            shown = ("eval/loss", "eval/rewards/accuracies")
            log0("eval @0: " + ", ".join(f"{k}={self.last_metrics[k]:.4f}" for k in shown if k in self.last_metrics))
        bar = tqdm(total=self.total_steps, initial=self.step, disable=rank() != 0, desc="train", dynamic_ncols=True)
        log = StepLog(self.sink, self.device)
        vocab_size = engine.module.config.vocab_size
        guard = NonFiniteGuard(self.device)  # no host sync per step: read at logging and before saves
        engine.train()
        while self.step < self.total_steps:
            lr_now = float(engine.get_lr()[0])  # the LR this update uses (host float, no sync)
            G = o.gradient_accumulation_steps
            examples = [self.train_ds[i] for i in self.sampler.global_indices(self.step)]
            micro = self.collate.step_batches(
                examples, G, self.loss_setup.sequences_run, world=world_size(), rank=rank()
            )
            check_vocab_range(micro, vocab_size, f"step {self.step + 1}")
            tokens = sum(b.real_tokens for b in micro)
            step_metrics = train_step(
                engine, micro, self.loss_setup, self.device, len(examples), len(cfg.data.target_langs)
            )
            self.step += 1
            step_metrics = self.callbacks.step_end(self.step, name_languages(step_metrics, cfg.data.target_langs))
            log.add(step_metrics, tokens)
            guard.observe(self.step, step_metrics)
            bar.update(1)
            step, last = self.step, self.step == self.total_steps
            if step % t.logging_steps == 0 or last:
                logged = log.write(
                    step,
                    grad_norm=engine.get_global_grad_norm(),
                    learning_rate=lr_now,
                    epoch=step / self.sampler.steps_per_epoch,
                )
                accuracy = logged.get("rewards/accuracies", float("nan"))
                bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{accuracy:.2f}", lr=f"{lr_now:.2e}")
                self.last_metrics.update(logged)
                guard.check(step, engine.get_global_grad_norm())
            if self.eval_ds is not None and ((t.eval_steps and step % t.eval_steps == 0) or last):
                self.evaluate_loss(step)
                log.restart_clock()  # eval time is not training throughput
            if (t.save_steps and step % t.save_steps == 0) or last:
                guard.check(step, engine.get_global_grad_norm())
                save_checkpoint(engine, cfg, step, {"metrics": self.last_metrics}, self.callbacks)
                log.restart_clock()
        bar.close()
        self.sink.close()

    def finish(self) -> None:
        """HF export, final report, process group down; then on rank 0 alone (no collective timeout applies) the
        optional evaluation, whose table goes into the model card, and the optional Hub upload."""
        cfg = self.cfg
        summary = {
            "steps": self.step,
            "world_size": world_size(),
            "cpu_numerics": numerics.describe(),
            "final_metrics": self.last_metrics,
            "config": to_dict(cfg),
            "base_model": self.model_path,
            "global_batch": self.sampler.global_batch,
            "data": {"train_examples": len(self.train_ds), "eval_examples": len(self.eval_ds) if self.eval_ds else 0},
        }
        export = export_hf(self.engine, cfg, self.tokenizer, summary) if cfg.train.export_hf else None
        is_rank0 = rank() == 0  # read before the process group goes: afterwards every process reports rank 0
        if is_rank0:
            log0("final metrics: " + format_metrics(self.last_metrics))
            log0(f"metrics log: {self.out_dir / 'metrics.jsonl'}; checkpoints: {checkpoint_root(cfg)}")
            if export is not None:
                log0(f"HF model exported to {export.resolve()}")
            (self.out_dir / "final_metrics.json").write_text(json.dumps(self.last_metrics, indent=1))
        barrier()
        torch.distributed.destroy_process_group()
        if not is_rank0 or export is None:
            return
        if cfg.train.run_evaluation:  # after the ranks part: no timeout
            self.evaluate_models(export)
        if cfg.train.push_to_hub:  # last: the card carries the evaluation table
            from clo_fast.training.hub import push_to_hub

            push_to_hub(cfg)

    def evaluate_models(self, export: Path) -> None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        del self.engine, self._keepalive
        unset_hf_deepspeed_config()  # plain (non-ZeRO) from_pretrained for the evaluation models
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        report = evaluate_models(self.cfg, [("base", self.model_path), ("trained", str(export))])
        log0(f"evaluation report: {Path(self.cfg.eval.output_dir).resolve()} ({len(report.get('models', {}))} models)")
        table = Path(report["files"]["markdown"]).read_text()
        print("\n" + table)  # the before/after table: the run's result, on stdout

        add_evaluation_to_card(export, self.cfg, table)  # the model card gains it too


def main(argv=None) -> int:
    from clo_fast.logs import setup_logging

    args = parse_args(argv)
    setup_logging(args.log_level)
    # validated before deepspeed and transformers are imported, so a bad field fails in a second
    cfg = load_config(args.config, args.set)
    if args.resume_unverified and not args.resume:
        raise ConfigError("--resume-unverified applies to --resume only")
    callbacks = args.callback if args.callback is not None else parse_specs(os.environ.get(CALLBACKS_ENV_VAR))
    try:
        run = Run(cfg, Path(args.config), args.resume, args.resume_unverified, callbacks)
    except ValueError as e:  # a callback that cannot be imported
        raise ConfigError(f"--callback: {e}") from None
    run.setup()
    run.data()
    run.model()
    run.train()
    run.finish()
    return 0


if __name__ == "__main__":
    from clo_fast.logs import get_logger

    log = get_logger("train")
    try:
        sys.exit(main())
    except (ConfigError, OutputDirError) as e:
        log.error(f"config error: {e}")
        sys.exit(2)
    except ValueError as e:  # bad input data or translation set-up: named by the message, no traceback
        if not isinstance(e, (DataError, TranslationError)):
            raise
        log.error(f"data error: {e}")
        sys.exit(2)
    except NonFiniteError as e:
        log.error(f"stopped: {e}")
        sys.exit(3)
