"""Tiny Grounding DINO and SAM checkpoints with random weights, saved the way the Hub serves them."""

import torch
from transformers import (
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessorPil,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessorPil,
    SamModel,
    SamProcessor,
    SwinConfig,
)

# Every word the grounding tests use; anything else tokenizes to [UNK], which is fine too.
WORDS = ["a", "the", "red", "blue", "green", "yellow", "car", "dog", "book", "vase", "cup", "on", "table", "and"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", *WORDS]


def tiny_bert_tokenizer() -> BertTokenizer:
    return BertTokenizer(vocab={token: index for index, token in enumerate(VOCAB)})


def save_tiny_grounding_dino(folder):
    """Grounding DINO with a 4-level Swin of width 8 and a 1-layer BERT of width 16 (transformers' test sizes)."""
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # transformers ties the decoder's box heads to layer 0: it needs a second layer
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=8,
        num_feature_levels=4,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
        use_timm_backbone=False,
        backbone_config=SwinConfig(
            window_size=7,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            image_size=64,
            out_indices=[2, 3, 4],
        ),
        text_config={
            "model_type": "bert",
            "vocab_size": len(VOCAB),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "max_position_embeddings": 32,
        },
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 96, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tiny_bert_tokenizer()).save_pretrained(folder)
    return folder


def save_tiny_sam(folder):
    """SAM with a 2-layer ViT of width 16 on 64-pixel inputs."""
    torch.manual_seed(0)
    config = SamConfig(
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "output_channels": 16,
            "window_size": 4,
            "global_attn_indexes": [1],
            "mlp_ratio": 2.0,
            "num_pos_feats": 8,
        },
        prompt_encoder_config={"hidden_size": 16, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
            "iou_head_depth": 2,
        },
    )
    SamModel(config).save_pretrained(folder)
    image_processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    return folder
