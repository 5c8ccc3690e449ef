"""Boxes from the original Grounding DINO code (Liu et al., 2023), as packaged by ``groundingdino-py``.

For users who have the original checkpoints (``groundingdino_swint_ogc.pth`` with its
``GroundingDINO_SwinT_OGC.py`` config) rather than transformers' conversions. Needs the ``[groundingdino]``
extra, which brings torchvision: the package is imported when a detector is built, never when
``realign_pipeline`` is. groundingdino-py 0.4.0 ships no compiled extension; its multi-scale deformable
attention runs in plain PyTorch, so CPU and GPU both work without building anything.

Why the model is assembled here: groundingdino-py's ``GroundingDINO`` class wraps BERT in a
``BertModelWarper`` that calls ``BertModel`` methods removed in transformers 5 (``get_head_mask``,
``get_extended_attention_mask``), so it cannot be built beside this package, which needs transformers 5
(upstream: IDEA-Research/GroundingDINO#446). [`GroundingDinoPyModel`] takes groundingdino-py's own backbone,
transformer, heads, tokenizer masks and image transforms, and feeds its transformer from transformers' BERT
directly, with the sub-sentence attention mask passed as a 4-D mask. Its parameter names are those of
``GroundingDINO``, so the original checkpoints load into it key for key.

Checkpoints are pickles; they are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers, never with groundingdino-py's own loader.
"""

from __future__ import annotations

import copy
import os

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn

from .base import BoxDetection, import_optional, resolve_device
from .boxes import (
    DEFAULT_BOX_THRESHOLD,
    DEFAULT_TEXT_THRESHOLD,
    detect_boxes,
)
from .segment_anything_backend import load_weights_only_checkpoint

# Buffers some transformers versions store in BERT checkpoints and others recompute.
OPTIONAL_CHECKPOINT_KEYS = ("bert.embeddings.position_ids",)


class GroundingDinoPyModel(nn.Module):
    """groundingdino-py's Grounding DINO for inference, with transformers' `BertModel` as its text encoder.

    Args:
        args: the groundingdino-py config (an ``SLConfig`` read from e.g. ``GroundingDINO_SwinT_OGC.py``).
        text_encoder: a `BertModel` of the config's text encoder architecture; its weights come from the
            Grounding DINO checkpoint, which fine-tuned it.
        tokenizer: that text encoder's tokenizer (a fast one: boxes map back to captions by offsets).
    """

    def __init__(self, args, text_encoder: nn.Module, tokenizer):
        super().__init__()
        import_optional("groundingdino", extra="groundingdino")
        from groundingdino.models.GroundingDINO.backbone import build_backbone
        from groundingdino.models.GroundingDINO.transformer import build_transformer
        from groundingdino.models.GroundingDINO.utils import MLP, ContrastiveEmbed

        if args.two_stage_type not in ("no", "standard"):
            raise ValueError(f"unknown two_stage_type {args.two_stage_type!r}")
        self.tokenizer = tokenizer
        self.max_text_len = int(args.max_text_len)
        self.sub_sentence_present = bool(args.sub_sentence_present)
        self.num_feature_levels = int(args.num_feature_levels)
        # Grounding DINO's phrase separators: each phrase attends only to itself in the text encoder.
        self.special_token_ids = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", ".", "?"])

        self.backbone = build_backbone(args)
        self.transformer = build_transformer(args)
        hidden_dim = self.transformer.d_model
        self.bert = text_encoder
        self.feat_map = nn.Linear(text_encoder.config.hidden_size, hidden_dim)

        # 1x1 projections of the backbone levels, then stride-2 convolutions for the extra coarser levels.
        projections = []
        in_channels = self.backbone.num_channels[-1]
        backbone_channels = self.backbone.num_channels if self.num_feature_levels > 1 else [in_channels]
        for channels in backbone_channels:
            projections.append(nn.Sequential(nn.Conv2d(channels, hidden_dim, 1), nn.GroupNorm(32, hidden_dim)))
        for _ in range(self.num_feature_levels - len(projections)):
            projections.append(
                nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1), nn.GroupNorm(32, hidden_dim))
            )
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)

        # The decoder refines boxes layer by layer with these heads, so it holds them too (same modules).
        layers = self.transformer.num_decoder_layers
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        class_head = ContrastiveEmbed()
        share = bool(args.dec_pred_bbox_embed_share)
        self.bbox_embed = nn.ModuleList([box_head if share else copy.deepcopy(box_head) for _ in range(layers)])
        self.class_embed = nn.ModuleList([class_head for _ in range(layers)])
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed
        if args.two_stage_type == "standard":
            # The encoder proposes the decoder's first boxes from its own outputs with these heads.
            self.transformer.enc_out_bbox_embed = (
                box_head if args.two_stage_bbox_embed_share else copy.deepcopy(box_head)
            )
            self.transformer.enc_out_class_embed = (
                class_head if args.two_stage_class_embed_share else copy.deepcopy(class_head)
            )

    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The text features the transformer reads, in groundingdino-py's ``text_dict`` layout."""
        from groundingdino.models.GroundingDINO.bertwarper import generate_masks_with_special_tokens_and_transfer_map

        tokenized = self.tokenizer(captions, padding="longest", return_tensors="pt").to(device)
        self_attention, position_ids, _ = generate_masks_with_special_tokens_and_transfer_map(
            tokenized, self.special_token_ids, self.tokenizer
        )
        length = min(tokenized["input_ids"].shape[1], self.max_text_len)
        input_ids = tokenized["input_ids"][:, :length]
        token_mask = tokenized["attention_mask"][:, :length].bool()
        self_attention = self_attention[:, :length, :length]
        position_ids = position_ids[:, :length]
        if self.sub_sentence_present:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=self_attention[:, None],  # (batch, 1, query, key): one block per phrase
                token_type_ids=tokenized["token_type_ids"][:, :length],
                position_ids=position_ids,
            ).last_hidden_state
        else:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=token_mask,
                token_type_ids=tokenized["token_type_ids"][:, :length],
            ).last_hidden_state
        return {
            "encoded_text": self.feat_map(hidden),
            "text_token_mask": token_mask,
            "position_ids": position_ids,
            "text_self_attention_masks": self_attention,
        }

    def forward(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token logits ``(batch, queries, max_text_len)`` and normalised ``(cx, cy, w, h)`` boxes.

        Args:
            pixel_values: ``(batch, 3, height, width)`` images, normalised as groundingdino-py does.
            captions: one detection prompt per image (``"a red car. a dog."``).
        """
        from groundingdino.util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list

        text = self.encode_text(captions, pixel_values.device)
        samples = nested_tensor_from_tensor_list(list(pixel_values))
        features, positions = self.backbone(samples)
        sources, masks = [], []
        for level, feature in enumerate(features):
            source, mask = feature.decompose()
            sources.append(self.input_proj[level](source))
            masks.append(mask)
        for level in range(len(features), self.num_feature_levels):
            source = self.input_proj[level](features[-1].tensors if level == len(features) else sources[-1])
            mask = F.interpolate(samples.mask[None].float(), size=source.shape[-2:]).to(torch.bool)[0]
            sources.append(source)
            masks.append(mask)
            positions.append(self.backbone[1](NestedTensor(source, mask)).to(source.dtype))

        hidden_states, references, *_ = self.transformer(sources, masks, None, positions, None, None, text)
        # The last decoder layer's box refines the reference box that layer started from.
        boxes = (self.bbox_embed[-1](hidden_states[-1]) + inverse_sigmoid(references[-2])).sigmoid()
        logits = self.class_embed[-1](hidden_states[-1], text)
        return logits, boxes


def build_groundingdino_py_model(
    config_path: str | os.PathLike,
    checkpoint_path: str | os.PathLike | None,
    text_encoder: str | os.PathLike | None = None,
) -> GroundingDinoPyModel:
    """Build the model a groundingdino-py config describes and load its checkpoint (weights only).

    Args:
        config_path: a groundingdino-py config file, e.g. ``GroundingDINO_SwinT_OGC.py``.
        checkpoint_path: the matching checkpoint; ``None`` leaves the weights random (for tests).
        text_encoder: a Hub id or folder for the BERT config and tokenizer; the config's
            ``text_encoder_type`` (``"bert-base-uncased"``) if not given. Only the architecture and vocabulary
            are read: the weights come from the checkpoint.
    """
    import_optional("groundingdino", extra="groundingdino")
    from groundingdino.util.slconfig import SLConfig
    from transformers import AutoTokenizer, BertConfig, BertModel

    args = SLConfig.fromfile(os.fspath(config_path))
    text_encoder = os.fspath(text_encoder or args.text_encoder_type)
    model = GroundingDinoPyModel(
        args, BertModel(BertConfig.from_pretrained(text_encoder)), AutoTokenizer.from_pretrained(text_encoder)
    )
    if checkpoint_path is not None:
        state_dict = {
            key.removeprefix("module."): value for key, value in load_weights_only_checkpoint(checkpoint_path).items()
        }
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if key not in OPTIONAL_CHECKPOINT_KEYS]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint_path} does not match {config_path}: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
    return model.eval()


class GroundingDinoPyBoxDetector:
    """One box per caption from the original Grounding DINO code; a [`BoxDetector`] for either SAM backend.

    Detection and box-to-caption mapping work as in [`GroundingDinoBoxDetector`]: all captions in one prompt,
    boxes mapped back by token positions, ``box_threshold`` and ``text_threshold`` with the same meaning.

    Args:
        model: a [`GroundingDinoPyModel`] in eval mode, on the device it should run on.
        box_threshold: see [`best_box_per_caption`].
        text_threshold: see [`best_box_per_caption`].
        image_size: the shorter image side the model sees (groundingdino-py's inference uses 800).
        max_image_size: the cap on the longer side (1333).
    """

    name = "groundingdino-py"

    def __init__(
        self,
        model: GroundingDinoPyModel,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        image_size: int = 800,
        max_image_size: int = 1333,
    ):
        import groundingdino.datasets.transforms as T

        self.model = model
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.transform = T.Compose(
            [
                T.RandomResize([image_size], max_size=max_image_size),  # one size: not random
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    @classmethod
    def from_checkpoint(
        cls,
        config_path: str | os.PathLike,
        checkpoint_path: str | os.PathLike | None,
        device: str | torch.device | None = None,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        text_threshold: float = DEFAULT_TEXT_THRESHOLD,
        text_encoder: str | os.PathLike | None = None,
        image_size: int = 800,
        max_image_size: int = 1333,
    ) -> GroundingDinoPyBoxDetector:
        """Build from a groundingdino-py config file and checkpoint; see [`build_groundingdino_py_model`].

        Args:
            device: where the model runs; CUDA when available if not given.
        """
        model = build_groundingdino_py_model(config_path, checkpoint_path, text_encoder=text_encoder)
        model.to(resolve_device(device))
        return cls(
            model,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            image_size=image_size,
            max_image_size=max_image_size,
        )

    @torch.no_grad()
    def __call__(self, image: PIL.Image.Image, captions: list[str]) -> list[BoxDetection | None]:
        """The best box for each caption, or ``None`` where no box passes both thresholds."""
        image = image.convert("RGB")
        pixel_values, _ = self.transform(image, None)
        parameter = next(self.model.parameters())
        pixel_values = pixel_values[None].to(parameter.device, parameter.dtype)

        def forward(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            logits, boxes = self.model(pixel_values, [text])
            return logits[0], boxes[0]

        return detect_boxes(
            image,
            captions,
            self.model.tokenizer,
            self.model.max_text_len,
            forward,
            self.box_threshold,
            self.text_threshold,
        )
