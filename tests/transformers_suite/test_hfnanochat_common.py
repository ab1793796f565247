"""transformers' own `ModelTesterMixin` and `ConfigTester` on our classes, as transformers runs them on its models.

Two testers with the shapes of transformers' causal-LM tester (vocab 99, hidden 32, 2 layers, 2 heads, batch 13 x 7):
the seed architecture, and the 2026 options on (SSSL windows, value embeddings, residual scalars, smear, backout).
The common test files come from the installed transformers' sdist (see common_tests.py); without them (no PyPI),
the module is skipped with the reason.

Like a built-in model, our class names are listed in transformers' auto-name tables for the length of the module
(several common tests look the base model up there, e.g. the RoPE-scaling ones).
"""

import contextlib
import unittest
from unittest import mock

import pytest
import torch
import torch.nn as nn
from transformers import initialization as init
from transformers.models.auto import modeling_auto

from hfnanochat import HFNanoChatConfig, HFNanoChatForCausalLM, HFNanoChatModel, HFNanoChatPreTrainedModel
from hfnanochat.modeling_hfnanochat import HFNanoChatRotaryEmbedding

from .common_tests import Unavailable, load

try:
    test_modeling_common, test_configuration_common = load()
except Unavailable as e:
    pytest.skip(f"transformers' own test files could not be fetched (needs PyPI once): {e}", allow_module_level=True)

ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
ids_tensor = test_modeling_common.ids_tensor

OPTIONS_2026 = dict(
    window_pattern="SSSL",
    short_window=3,  # shorter than the tester's 7 tokens, so the windows mask something
    value_embeddings=True,
    residual_scalars=True,
    smear=True,
    backout=True,
    qk_scale=1.2,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    init_scheme="2026",
)


@pytest.fixture(scope="module", autouse=True)
def listed_in_auto_tables():
    tables = [
        (modeling_auto.MODEL_MAPPING_NAMES, "HFNanoChatModel"),
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "HFNanoChatForCausalLM"),
    ]
    for table, name in tables:
        table["hfnanochat"] = name
    yield
    for table, _ in tables:
        table.pop("hfnanochat", None)


@contextlib.contextmanager
def random_output_projections():
    """nanochat's init zeroes the attention/MLP output projections and (seed) the LM head, so a fresh model's
    hidden states do not depend on RoPE and its logits are all equal. Tests whose premise is a random model with
    position- and target-sensitive outputs run with those weights drawn N(0, 0.02) instead."""
    nanochat_init = HFNanoChatPreTrainedModel._init_weights

    def drawn(self, module):
        nanochat_init(self, module)
        if isinstance(module, nn.Linear) and getattr(module, "init_role", "") in ("matrix_out", "lm_head"):
            init.normal_(module.weight, std=0.02)

    with mock.patch.object(HFNanoChatPreTrainedModel, "_init_weights", drawn):
        yield


class HFNanoChatModelTester:
    """transformers' causal-LM tester shapes; `options` switches on 2026 features."""

    def __init__(self, parent, options=None, batch_size=13, seq_length=7):
        self.parent = parent
        self.options = options or {}
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.num_key_value_heads = 2
        self.intermediate_size = 37
        self.max_position_embeddings = 512
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.head_dim = self.hidden_size // self.num_attention_heads

    def get_config(self) -> HFNanoChatConfig:
        return HFNanoChatConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            **self.options,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class SeedArchitectureTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (HFNanoChatModel, HFNanoChatForCausalLM)
    options: dict = {}

    # transformers' GenerationTesterMixin is not in its sdist (common_tests.py); without it, a tester must list no
    # generative classes. generate() has our own tests: tests/test_generation_contract.py.
    all_generative_model_classes = ()
    # the common test dates a model by a copyright line in its config file (ours has none): run it, as for new models
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = HFNanoChatModelTester(self, self.options)
        self.config_tester = ConfigTester(self, config_class=HFNanoChatConfig, hidden_size=40, num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = HFNanoChatModel(config).eval()
        out = model(**inputs)
        self.assertEqual(out.last_hidden_state.shape, (13, 7, 32))

    def test_rotary_layer_is_found(self):
        """The RoPE tests find the rotary layer by its attribute name; they must not skip for want of it."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        self.assertIsInstance(HFNanoChatModel(config).rotary_emb, HFNanoChatRotaryEmbedding)

    def test_model_rope_scaling_from_config_0_linear(self):
        with random_output_projections():
            super().test_model_rope_scaling_from_config_0_linear()

    def test_model_rope_scaling_from_config_1_dynamic(self):
        with random_output_projections():
            super().test_model_rope_scaling_from_config_1_dynamic()

    def test_model_rope_scaling_from_config_2_yarn(self):
        with random_output_projections():
            super().test_model_rope_scaling_from_config_2_yarn()

    def test_causal_lm_loss_honors_shift_labels(self):
        with random_output_projections():
            super().test_causal_lm_loss_honors_shift_labels()


class Options2026Test(SeedArchitectureTest):
    options = OPTIONS_2026

    @unittest.skip("value embeddings are looked up by token id: a forward from inputs_embeds alone cannot have them")
    def test_inputs_embeds(self):
        pass

    @unittest.skip("value embeddings are looked up by token id: a forward from inputs_embeds alone cannot have them")
    def test_inputs_embeds_matches_input_ids(self):
        pass
