"""lm-evaluation-harness on megatron-core models: dense, ESPACE or compressed, any TP/PP.

Needs ``pip install -e .[eval]``. ``espace evaluate --load CKPT --tasks ...`` builds the
model and runs the tasks through :func:`run_tasks`; from Python::

    import megatron_espace.lm_eval_adapter  # registers the model name "megatron_espace"
    lm_eval.simple_evaluate(model="megatron_espace",
                            model_args={"argv": "--load CKPT --num-layers 2 ..."}, tasks=[...])

``argv`` holds the ``espace evaluate`` model flags (the model, ESPACE and parallelism
flags). Under torchrun every rank runs the same harness calls: the model-parallel ranks
compute together, the data-parallel ranks split the requests, and every rank gets all
results (lm-eval itself sees one process). Scores are log-softmaxes over the real
vocabulary: Megatron's padded vocabulary columns are left out.
"""

import logging
import shlex

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_espace import evaluate


@register_model("megatron_espace")
class MegatronESPACELM(TemplateLM):
    """A ``TemplateLM`` over a megatron-core GPT model.

    Either ``argv`` (the ``espace evaluate`` model flags, a string or a list: the model is
    built and loaded, and megatron initialised if it is not yet), or an already loaded
    ``model`` with its ``tokenizer`` and parsed ``args``. ``batch_size`` overrides
    ``--micro-batch-size``; ``max_length`` (default ``--seq-length``) is the longest input.
    Greedy generation only.
    """

    def __init__(self, argv=None, *, model=None, tokenizer=None, args=None, batch_size=None,
                 max_length=None, max_gen_toks: int = 256, **_unused):  # e.g. device=
        super().__init__()
        if argv is not None:
            if model is not None:
                raise ValueError("megatron_espace: give argv or model, not both")
            from megatron.core import parallel_state

            from megatron_espace import runtime

            args = evaluate.parse_args(shlex.split(argv) if isinstance(argv, str) else argv,
                                       need_input=False)
            if not parallel_state.model_parallel_is_initialized():
                runtime.initialize(args.tensor_model_parallel_size,
                                   args.pipeline_model_parallel_size, seed=args.seed)
            model, tokenizer = evaluate.load_model(args)
        if model is None or tokenizer is None or args is None:
            raise ValueError("megatron_espace: needs argv='--load CKPT ...' (or model, "
                             "tokenizer and args)")
        self.model, self.tok, self.args = model, tokenizer, args
        self.vocab_size = evaluate.real_vocab_size(args, tokenizer)
        if batch_size not in (None, "auto"):
            args.micro_batch_size = int(batch_size)
        self.max_length = int(max_length or args.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self.quiet = not evaluate._rank0()

    # ---------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.unique_identifiers)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        return self.tok.tokenize(string)

    def tok_decode(self, ids) -> str:
        return self.tok.detokenize(ids)

    def get_model_info(self) -> dict:
        a = self.args
        return {"load": str(a.load), "espace_config": a.espace_config,
                "espace_projections": a.espace_projections,
                "espace_compressed": a.espace_compressed,
                "tensor_model_parallel_size": a.tensor_model_parallel_size,
                "pipeline_model_parallel_size": a.pipeline_model_parallel_size}

    # ---------------------------------------------------------------- scoring

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _score(self, sequences):
        return evaluate.score(self.model, sequences, self.vocab_size, self.args,
                              desc="lm-eval")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``[(log p(continuation | context), greedy)]`` for ``(key, context, continuation)``."""
        sequences = []
        for _, context, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"megatron_espace: a continuation of {len(continuation)} "
                                 f"tokens; it must fit the window (1 to max_length = "
                                 f"{self.max_length} tokens)")
            # the context is cut on the left to fit the window, as lm-eval's HF model does
            sequences.append(((context + continuation)[-(self.max_length + 1):],
                              len(continuation)))
        results = self._score(sequences)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Each string's log-likelihood, in disjoint windows of ``max_length`` after the
        end-of-text token (lm-eval's rolling protocol)."""
        sequences, owner = [], []
        for n, request in enumerate(requests):
            (string,) = request.args
            spans = get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, spans):
                sequences.append((context + continuation, len(continuation)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(sequences)):
            totals[n] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    # ---------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy continuations, cut before the first stop string (``until``)."""
        from megatron.core import parallel_state
        from tqdm import tqdm

        jobs = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError(f"megatron_espace: only greedy generation is implemented; "
                                 f"got generation kwargs {kwargs}")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            steps = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - steps):] or [self.eot_token_id]
            jobs.append((ids, until, min(steps, self.max_length - len(ids) + 1)))

        dp = parallel_state.get_data_parallel_world_size()
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        mine = order[parallel_state.get_data_parallel_rank()::dp]
        chunk = evaluate.GROUP * self.args.micro_batch_size
        texts = {}
        for start in tqdm(range(0, len(mine), chunk), desc="lm-eval generate",
                          disable=disable_tqdm or self.quiet):
            texts.update(self._generate([(i, *jobs[i]) for i in mine[start:start + chunk]]))
        texts = evaluate._model_parallel_results(texts)
        out = [texts[i] for i in range(len(jobs))]
        for request, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out

    def _generate(self, jobs) -> dict:
        """``{index: text}`` for ``(index, context ids, until, max new tokens)`` jobs."""
        new = {i: [] for i, *_ in jobs}
        active = [job for job in jobs if job[3] > 0]
        while active:
            nexts = evaluate.next_tokens(self.model, [ids + new[i] for i, ids, _, _ in active],
                                         self.vocab_size, self.args)
            still = []
            for (i, ids, until, steps), token in zip(active, nexts):
                if token == self.eot_token_id:
                    continue
                new[i].append(token)
                text = self.tok_decode(new[i])
                if len(new[i]) < steps and not any(s in text for s in until):
                    still.append((i, ids, until, steps))
            active = still
        out = {}
        for i, _, until, _ in jobs:
            text = self.tok_decode(new[i])
            cut = min((text.find(s) for s in until if s and s in text), default=len(text))
            out[i] = text[:cut]
        return out


def run_tasks(lm, tasks, include_path=None, num_fewshot=None, limit=None, **kwargs):
    """``lm_eval.simple_evaluate`` on ``tasks`` (names; ``include_path``: a directory of task
    YAMLs); prints lm-eval's table on rank 0 and returns its results (None on other ranks).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if lm.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=TaskManager(include_path=include_path), log_samples=False, **kwargs)
    if lm.quiet or results is None:
        return None
    print(make_table(results), flush=True)
    return {key: results[key] for key in ("results", "versions", "n-shot", "n-samples",
                                          "higher_is_better") if key in results}
