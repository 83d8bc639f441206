"""Sampled token ids -> RequestOutputs: detokenizing, EOS, stop strings, max_tokens, the
stream interval, and the final output with its finish reason and token counts."""

from __future__ import annotations

from typing import Any

from serve_app.engine.sampling import RowLogprobs
from serve_app.engine.sequence import Sequence, SequenceStatus
from serve_app.engine.types import FinishReason, RequestOutput, TokenLogprob


class OutputProcessor:
    def __init__(
        self, tokenizer: Any, *, eos_token_ids: set[int], stream_interval: int = 1
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.stream_interval = stream_interval  # tokens per streamed chunk after the first
        self.num_finished = 0
        self.num_aborted = 0

    def append_token(
        self, seq: Sequence, token_id: int, logprobs: RowLogprobs | None = None
    ) -> RequestOutput | None:
        """Takes one new token. Returns the output to send: a text delta (None if nothing is
        due yet) or, when this token ends the request, its final output (seq.is_finished)."""
        seq.num_generated += 1
        seq.last_token = token_id
        seq.output_ids.append(token_id)
        seq.sampler.record(token_id)
        if logprobs is not None:
            seq.unsent_logprobs.append(self._token_logprob(token_id, logprobs))
        if seq.grammar is not None:
            seq.grammar.consume(token_id)
        if token_id in self.eos_token_ids and not seq.sampler.params.ignore_eos:
            return self.finish(seq, FinishReason.STOP, seq.stop_matcher.flush())
        delta = seq.detokenizer.push(token_id)
        is_grammar_done = seq.grammar is not None and seq.grammar.is_done
        is_length = seq.num_generated >= seq.max_tokens
        if is_length or is_grammar_done:
            delta += seq.detokenizer.flush()
        text, hit_stop = seq.stop_matcher.feed(delta)
        if hit_stop:
            return self.finish(seq, FinishReason.STOP, text)
        if is_grammar_done:  # a complete grammar admits no further token
            return self.finish(seq, FinishReason.STOP, text + seq.stop_matcher.flush())
        if is_length:
            return self.finish(seq, FinishReason.LENGTH, text + seq.stop_matcher.flush())
        seq.unsent_text += text
        if seq.unsent_text and (
            seq.num_streamed == 0 or seq.num_generated - seq.num_streamed >= self.stream_interval
        ):  # the first text goes at once (time to first token), then every stream_interval
            output = self._output(seq, seq.unsent_text, None)
            seq.unsent_text, seq.num_streamed = "", seq.num_generated
            return output
        return None

    def finish(
        self, seq: Sequence, reason: FinishReason, text: str = "", error: str | None = None
    ) -> RequestOutput:
        """Ends the request: the final output carries whatever text was still held."""
        seq.finish_reason = reason
        seq.status = (
            SequenceStatus.ABORTED if reason is FinishReason.ABORT else (SequenceStatus.FINISHED)
        )
        seq.prefix = None  # never prefilled: its cached views must not outlive it
        text, seq.unsent_text = seq.unsent_text + text, ""
        if reason is FinishReason.ERROR:
            seq.unsent_logprobs = []
        if reason is FinishReason.ABORT:
            self.num_aborted += 1
        else:
            self.num_finished += 1
        return self._output(seq, text, reason, error)

    def _token_logprob(self, token_id: int, logprobs: RowLogprobs) -> TokenLogprob:
        top = zip(logprobs.top_ids, logprobs.top_logprobs, strict=True)
        return TokenLogprob(
            token_id=token_id,
            token=self._text_of(token_id),
            logprob=logprobs.logprob,
            top=[(i, self._text_of(i), value) for i, value in top],
        )

    def _text_of(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def _output(
        self, seq: Sequence, text: str, reason: FinishReason | None, error: str | None = None
    ) -> RequestOutput:
        logprobs, seq.unsent_logprobs = seq.unsent_logprobs or None, []
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=seq.num_generated,
            finish_reason=reason,
            num_cached_prompt_tokens=seq.num_cached or 0,
            error=error,
            queue_time_s=seq.queue_time_s,
            logprobs=logprobs,
        )
