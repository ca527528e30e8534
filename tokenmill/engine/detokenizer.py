"""Incremental detokenization and stop strings.

Text is produced token by token without re-decoding the whole output: each
update decodes a short window and keeps only what the new token added, and
waits while a token ends in the middle of a multi-byte character. Stop strings
are searched only in the newly added tail and cut out of the text; a streaming
reader is never handed characters that might still turn out to start a stop
string.
"""
from __future__ import annotations

from tokenmill.engine.request import SamplingParams

# Prompt tokens kept as left context so that the first generated token decodes
# with the spacing it has inside the sentence.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._num_output_tokens = 0
        self.output_text = ""
        self._num_emitted_chars = 0

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_id: int) -> str | None:
        """Add one generated token. Returns the stop string it completed, if any
        (the text is then already cut at the stop string)."""
        self._tokens.append(token_id)
        self._num_output_tokens += 1
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        new_text = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        search_from = max(0, len(self.output_text) - self._max_stop_len + 1)
        self.output_text += new_text
        if not self.stop or self._num_output_tokens < self.min_tokens:
            return None
        for stop in self.stop:
            index = self.output_text.find(stop, search_from)
            if index != -1:
                self.output_text = self.output_text[:index + len(stop) if self.include_stop else index]
                return stop
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not yet handed out. Until the request finishes, the last
        (longest stop string - 1) characters are held back."""
        end = len(self.output_text)
        if not finished and self.stop and not self.include_stop:
            end -= self._max_stop_len - 1
        if end <= self._num_emitted_chars:
            return ""
        delta = self.output_text[self._num_emitted_chars:end]
        self._num_emitted_chars = end
        return delta
