"""Box the object an expression refers to, in one image.

    python predict.py --weights logs/refcoco/best.pth --image photo.jpg --expr "the man in the red shirt"
    python predict.py --weights CKPT --image photo.jpg --expr "left dog" --out boxed.png

Prints ``x1 y1 x2 y2 score`` in the image's pixels. The config and vocabulary come from the
checkpoint (one written by train.py).
"""
from __future__ import annotations

import argparse
import os

import cv2
import numpy as np
import torch

from datasets import encode, letterbox_image, letterbox_to_original
from utils.checkpoint import load_checkpoint
from utils.distributed import local_device
from utils.cli import run_main
from utils.inference import config_from_checkpoint, model_for_evaluation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint written by train.py")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--expr", required=True, help="the referring expression")
    parser.add_argument("--out", default="", help="write the image with the box drawn here")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    return parser


def predict_box(weights: str, image_bgr: np.ndarray, expression: str, device: torch.device) -> np.ndarray:
    """``[5]``: x1, y1, x2, y2 in the image's pixels, and the detector's objectness."""
    ckpt = load_checkpoint(weights, "weights")
    cfg = config_from_checkpoint(ckpt, weights)
    vocab = ckpt["vocab"]
    model = model_for_evaluation(weights, cfg, vocab, device)
    size = cfg.INPUT_SHAPE[0]
    square, geometry = letterbox_image(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB), size)
    image = torch.from_numpy(square).permute(2, 0, 1).float().div(255)
    image = (image - torch.tensor(cfg.MEAN).view(3, 1, 1)) / torch.tensor(cfg.STD).view(3, 1, 1)
    max_token = cfg.MAX_TOKEN if cfg.MAX_TOKEN > 0 else 32
    tokens = encode(expression, {t: i for i, t in enumerate(vocab)}, max_token)
    with torch.no_grad():
        boxes = model(image[None].to(device), torch.from_numpy(tokens)[None, None].to(device))
    info = torch.tensor([geometry + (0,)], device=device)
    xyxy = letterbox_to_original(boxes[:, 0, :4].float(), info)[0]
    return np.concatenate([xyxy.cpu().numpy(), boxes[0, 0, 4:5].float().cpu().numpy()])


def main(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.image):
        raise FileNotFoundError(f"image not found: {args.image}")
    image = cv2.imread(args.image, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"cannot decode {args.image} as an image")
    box = predict_box(args.weights, image, args.expr, local_device(args.device))
    print(" ".join(f"{v:.1f}" for v in box[:4]) + f" {box[4]:.3f}")
    if args.out:
        x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 0, 255), 2)
        cv2.putText(image, args.expr[:60], (max(0, x1), max(14, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 255), 1, cv2.LINE_AA)
        cv2.imwrite(args.out, image)
        print(f"drawn: {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main, get_args_parser())
