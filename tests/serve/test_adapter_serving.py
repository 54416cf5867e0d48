"""A LoRA adapter folder served: its base and adapter merged in memory, answering as the merged model does."""

import pytest
import torch

from llmscratch.checkpoint import load_model
from llmscratch.generate import generate
from llmscratch.lora import apply_lora, lora_layers, save_adapter
from llmscratch.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def adapter_folder(tiny_checkpoint, tmp_path_factory):
    model = load_model(tiny_checkpoint)
    apply_lora(model, "all", rank=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: the served answers must differ from the base's
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    folder = tmp_path_factory.mktemp("adapter") / "tiny-adapter"
    save_adapter(folder, model, tiny_checkpoint, load_tokenizer(tiny_checkpoint))
    return folder


def test_an_adapter_folder_is_served_merged(adapter_folder, tiny_checkpoint, start_server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    from llmscratch.lora import load_merged

    server = start_server(adapter_folder)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        assert [m.id for m in client.models.list()] == ["tiny-adapter"]
        text = client.completions.create(model="tiny-adapter", prompt="The module", max_tokens=12,
                                         temperature=0).choices[0].text
    finally:
        server.stop()
    merged, tok = load_merged(adapter_folder)
    base = load_model(tiny_checkpoint)
    expected = generate(merged, tok, "The module", max_new_tokens=12, temperature=0.0)
    assert text == expected
    assert text != generate(base, tok, "The module", max_new_tokens=12, temperature=0.0)
