"""ModelKind: which kind of model a HF config describes (the routes and prefixes that fit it)."""

import pytest
from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig, T5Config

from server.prefix import ModelKind


@pytest.mark.parametrize(("config", "kind"), [
    (LlamaConfig(architectures=["LlamaForCausalLM"]), ModelKind.CAUSAL_LM),
    (GPT2Config(architectures=["GPT2LMHeadModel"]), ModelKind.CAUSAL_LM),
    (LlamaConfig(), ModelKind.CAUSAL_LM),  # config-built test models name no architecture
    (BartConfig(architectures=["BartForConditionalGeneration"]), ModelKind.SEQ2SEQ_LM),
    (T5Config(architectures=["T5ForConditionalGeneration"]), ModelKind.SEQ2SEQ_LM),
    (BartConfig(), ModelKind.SEQ2SEQ_LM),  # is_encoder_decoder
    (BertConfig(architectures=["BertForSequenceClassification"]), ModelKind.SEQ_CLS),
])
def test_kind_of_config(config, kind):
    assert ModelKind.of_config(config) is kind


def test_peft_task_types():
    assert [k.peft_task_type for k in ModelKind] == ["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"]
