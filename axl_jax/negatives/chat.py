"""A PyTorch-free chat tokenizer: ``tokenizer.json`` through ``tokenizers``, the chat template through jinja2.

``transformers`` is not used here on purpose: importing it pulls in torch whenever torch is installed,
and the generator process must never import torch. The template comes from ``chat_template.jinja``
or ``tokenizer_config.json`` (where Qwen keeps it) and renders the way HF renders it (sandboxed,
``trim_blocks`` and ``lstrip_blocks``).
"""
from __future__ import annotations

import json
import os


class ChatTokenizer:
  def __init__(self, directory: str):
    from tokenizers import Tokenizer
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{directory}: no tokenizer.json (a fast tokenizer file is needed)")
    self.tokenizer = Tokenizer.from_file(path)
    config_path = os.path.join(directory, "tokenizer_config.json")
    self.config = {}
    if os.path.exists(config_path):
      with open(config_path, encoding="utf-8") as file:
        self.config = json.load(file)
    template_path = os.path.join(directory, "chat_template.jinja")
    template = self.config.get("chat_template")
    if os.path.exists(template_path):
      with open(template_path, encoding="utf-8") as file:
        template = file.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    if not template:
      raise ValueError(f"{directory}: the tokenizer has no chat template (chat_template.jinja or "
                       "tokenizer_config.json's chat_template)")
    import jinja2
    import jinja2.sandbox

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    self.template = environment.from_string(template)

  def token(self, name: str) -> str | None:
    value = self.config.get(name)
    return value.get("content") if isinstance(value, dict) else value

  def token_id(self, token: str | None) -> int | None:
    return self.tokenizer.token_to_id(token) if token else None

  def end_ids(self) -> list[int]:
    """Ids that end a turn: ``<|im_end|>`` and ``<|endoftext|>`` where present, and the eos token."""
    candidates = ["<|im_end|>", "<|endoftext|>", self.token("eos_token")]
    return sorted({i for i in (self.token_id(t) for t in candidates) if i is not None})

  def pad_id(self) -> int:
    pad = self.token_id(self.token("pad_token"))
    return pad if pad is not None else self.end_ids()[0]

  def prompt_ids(self, messages: list[dict]) -> list[int]:
    text = self.template.render(messages=messages, add_generation_prompt=True,
                                bos_token=self.token("bos_token") or "", eos_token=self.token("eos_token") or "")
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)
