"""Tiny Hugging Face models' configs (random weights, nothing downloaded), for the tests of
replace_linear and nanomoe compress."""


def bert_config(transformers):
    return transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )


def gpt2_config(transformers):
    return transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
