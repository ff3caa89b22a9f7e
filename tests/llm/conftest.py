import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama(tied: bool = True, seed: int = 0, hidden: int = 64, vocab: int = 256):
    """A random 2-layer Llama (GQA, RoPE) small enough for tests; scaled-up init so logits are not flat."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=tied, initializer_range=0.1,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (1, 32), generator=g) for _ in range(4)]


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, 256, (1, n), generator=g) for n in (5, 9, 16)]


def tiny_tokenizer(vocab: int = 256):
    """A word-level tokenizer: "w3 w17 ..." → ids 3, 17, ... (ids 0-2: <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<unk>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A local Hugging Face model folder (config.json, safetensors, tokenizer) of the tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
