from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from realign_pipeline.toy_pipeline import TOY_WORDS, write_clip_tokenizer_files


def test_toy_tokenizer_spells_each_known_word_as_one_token(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in TOY_WORDS.split():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Unknown words still tokenize, as characters.
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) > 1


def test_toy_pipeline_folder_loads_with_plain_diffusers(toy_pipeline_folder):
    pipe = StableDiffusionPipeline.from_pretrained(toy_pipeline_folder)
    assert pipe.unet.config.sample_size == 16
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert (toy_pipeline_folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
