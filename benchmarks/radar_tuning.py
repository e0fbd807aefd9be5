"""How RADAR's defaults were chosen: its variants on the *tuning* textures of the devbench, and their latency.

Two sub-commands, both printing one JSON line per result (and appending it to ``--log``):

``quality``: trains one RADAR U-Net (a plain loop over random patches of 32 of a category's 40 normal training
images; the other 8 are held out) and scores the test split with several inference variants of that one
network: timestep ``t``, noise draws, patch or full-image pass, and for each the anomaly maps (smoothed
Sobel map, smoothed noise map, their standardised maximum) and image scores (mean of the top 0.1 / 1 / 5 % of the
map; the paper's Isolation Forest on the two Sobel features, fitted on the held-out or on the training images).
``"border_bands": [1, 16, ...]`` in the run's JSON standardises the maps with that many border bands each (RADAR's
``border_bands``; 1 is one mean and spread per map), and reports every band count side by side; ``"sigmas": [2, 4, 8]``
does the same for the maps' Gaussian smoothing (RADAR's ``anomaly_map_sigma``). ``"ema": [0.995, 0.999]`` also
scores exponential moving averages of the same training's weights (keys prefixed ``ema0.995_``), and
``"lr_schedule": "cosine"`` anneals the learning rate to 0 over the run instead of keeping it at ``"lr"`` (1e-3).
``"augment": "flips"`` flips each training patch at random (left-right, upside down), ``"symmetries"`` also
transposes it (the eight symmetries of a square). ``"coarse_scales": [[4], [4, 8]]`` also scores each combined map
joined by the noise maps of extra U-Net passes over the image average-pooled by those factors (RADAR's
``coarse_scales``; keys suffixed ``_coarse4``, ``_coarse4-8``). Each margin comes with the defect type of the lowest
defective image (``weakest_...``).
Image and pixel AUROC with scikit-learn. The defaults of ``RADAR`` are what won here on the tuning half
(bump-relief, melt, vegetal); the held-out half is measured only by ``benchmarks/report.py``::

    anomalib-diffusion-demo-data --textures ../shared/devbench/textures --root datasets/devbench
    python benchmarks/radar_tuning.py quality --root datasets/devbench --category bump-relief \\
        --run '{"tag": "w8_16", "widths": [8, 16], "attention": [], "mid_attention": false, "train_timesteps": [0, 200],
                "variants": [[10, 1, "full"], [25, 1, "full"]]}'

``latency``: OpenVINO FP32 latency (min and median of 25 interleaved runs, batch 1, 256x256) of untrained RADAR
networks of several widths (and ``--coarse-scales`` sets) against anomalib's PaDiM on EfficientNet-Lite0 compiled in
the same process::

    python benchmarks/radar_tuning.py latency --widths 8,16 8,16,32 16,32,64
    python benchmarks/radar_tuning.py latency --widths 8,8 --coarse-scales none 4 2,4
"""

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
import torch
import torch.nn.functional as F  # noqa: N812
from diffusers.training_utils import EMAModel
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomalib_diffusion.components import (
    BorderStandardiser,
    SeparableGaussianBlur,
    TensorIsolationForest,
    UNetConfig,
    band_moments,
    build_unet,
    edge_features,
    extract_patches,
    make_ddpm_scheduler,
    noise_at_timestep,
    random_patches,
    seeded_noise,
    sobel_edge_map,
    stitch_patches,
)
from anomalib_diffusion.deploy import compile_config

if TYPE_CHECKING:
    from anomalib_diffusion.models import PadimLite0

DEFAULT_RUN = {
    "tag": "default",
    "steps": 300,
    "widths": [8, 16],
    "layers": 1,
    "attention": [],
    "mid_attention": False,
    "patch": 64,
    "patches_per_step": 16,
    "train_timesteps": [0, 200],
    "size": 256,
    "variants": [[10, 1, "full"]],
    "border_bands": [1],
    "sigmas": [4.0],
    "ema": [],
    "lr_schedule": "constant",
    "augment": "none",
    "lr": 1e-3,
    "coarse_scales": [],
}

TOP_SHARES = (0.001, 0.01, 0.05)


def load_image(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def load_category(root: Path, category: str, size: int) -> dict:
    train = sorted((root / category / "train" / "good").glob("*.png"))
    held_out = train[::5]
    paths, labels, masks, types = [], [], [], []
    for folder in sorted((root / category / "test").iterdir()):
        for path in sorted(folder.glob("*.png")):
            paths.append(path)
            types.append(folder.name)
            labels.append(int(folder.name != "good"))
            if folder.name == "good":
                masks.append(np.zeros((size, size), dtype=bool))
            else:
                mask = Image.open(root / category / "ground_truth" / folder.name / f"{path.stem}_mask.png")
                masks.append(np.asarray(mask.resize((size, size), Image.NEAREST)) > 0)
    return {
        "fit": torch.stack([load_image(path, size) for path in train if path not in held_out]),
        "held_out": torch.stack([load_image(path, size) for path in held_out]),
        "test": torch.stack([load_image(path, size) for path in paths]),
        "labels": np.array(labels),
        "masks": np.stack(masks),
        "types": np.array(types),
    }


def random_symmetries(patches: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """Each square patch flipped left-right and upside down, each with probability 1/2, and with ``transpose`` also
    transposed (probability 1/2): a uniform draw of the eight symmetries of a square; without it, of the four flips."""
    draws = torch.rand(3, patches.shape[0]).lt(0.5)[:, :, None, None, None]
    patches = torch.where(draws[0], patches.flip(-1), patches)
    patches = torch.where(draws[1], patches.flip(-2), patches)
    return torch.where(draws[2], patches.transpose(-1, -2), patches) if transpose else patches


def quality(args: argparse.Namespace) -> None:
    run = DEFAULT_RUN | json.loads(args.run)
    if run["augment"] not in {"none", "flips", "symmetries"}:
        raise SystemExit(f'"augment": {run["augment"]!r} is not one of "none", "flips", "symmetries"')
    data = load_category(args.root, args.category, run["size"])
    torch.manual_seed(0)
    config = UNetConfig(
        sample_size=run["patch"],
        block_out_channels=tuple(run["widths"]),
        layers_per_block=run["layers"],
        attention_resolutions=tuple(run["attention"]),
        mid_attention=run["mid_attention"],
    )
    unet, scheduler = build_unet(config), make_ddpm_scheduler()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=run["lr"])
    decay_lr = None
    if run["lr_schedule"] == "cosine":
        decay_lr = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, run["steps"])
    # weight averages of the same training, scored beside the raw weights (diffusers' EMA with its warm-up, as GLAD's)
    averages = {decay: EMAModel(unet.parameters(), decay=decay) for decay in run["ema"]}
    start = time.perf_counter()
    low, high = run["train_timesteps"]
    for _ in range(run["steps"]):
        images = data["fit"][torch.randint(len(data["fit"]), (8,))]
        patches = random_patches(images, run["patch"], run["patches_per_step"]) * 2 - 1
        if run["augment"] != "none":  # "flips" or "symmetries" (flips and quarter turns)
            patches = random_symmetries(patches, transpose=run["augment"] == "symmetries")
        noise = torch.randn_like(patches)
        timesteps = torch.randint(low, high, (patches.shape[0],))
        loss = F.mse_loss(unet(scheduler.add_noise(patches, noise, timesteps), timesteps).sample, noise)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if decay_lr is not None:
            decay_lr.step()
        for average in averages.values():
            average.step(unet.parameters())
    result = {"category": args.category, "tag": run["tag"], "train_s": round(time.perf_counter() - start)}
    unet.eval()
    networks = {"": unet}
    for decay, average in averages.items():
        averaged = networks[f"ema{decay:g}_"] = copy.deepcopy(unet)
        average.copy_to(averaged.parameters())
    for prefix, network in networks.items():
        result |= score_network(network, scheduler, data, run, args, prefix)
    report(result, args.log)


def score_network(
    unet: torch.nn.Module, scheduler: object, data: dict, run: dict, args: argparse.Namespace, prefix: str
) -> dict:
    """Image and pixel AUROC and margins of one trained network for each inference variant of ``run``."""
    size = run["size"]
    result = {}

    @torch.no_grad()
    def noise_map(images: torch.Tensor, timestep: int, draws: int, mode: str) -> torch.Tensor:
        total = 0
        height, width = images.shape[-2:]  # a coarse pass's pooled images take the top-left of the noise, as RADAR's
        for draw in range(draws):
            noise = seeded_noise((1, 3, size, size), draw)[..., :height, :width].expand(len(images), -1, -1, -1)
            noisy = noise_at_timestep(scheduler, images * 2 - 1, noise, timestep)
            if mode == "full":
                predicted = torch.cat([unet(chunk, timestep).sample for chunk in noisy.split(16)])
            else:
                patches = extract_patches(noisy, run["patch"], 32)
                predicted = torch.cat([unet(chunk, timestep).sample for chunk in patches.split(64)])
                predicted = stitch_patches(predicted, len(images), (size, size), 32)
            total = total + torch.linalg.vector_norm(predicted - noise, dim=1, keepdim=True)
        return total / draws

    def coarse_map(images: torch.Tensor, scale: int, timestep: int, draws: int) -> torch.Tensor:
        """The noise map of one full pass over the images average-pooled by ``scale``, upsampled (RADAR's)."""
        small = noise_map(F.avg_pool2d(images, scale), timestep, draws, "full")
        return F.interpolate(small, scale_factor=float(scale), mode="bilinear", align_corners=False)

    labels, masks, types = data["labels"], data["masks"], data["types"]
    defective = torch.from_numpy(labels == 1)
    scales = sorted({scale for scale_set in run["coarse_scales"] for scale in scale_set})
    for timestep, draws, mode in run["variants"]:
        held, test = noise_map(data["held_out"], timestep, draws, mode), noise_map(data["test"], timestep, draws, mode)
        held_edges, test_edges = sobel_edge_map(held), sobel_edge_map(test)
        held_coarse = [coarse_map(data["held_out"], scale, timestep, draws) for scale in scales]
        test_coarse = [coarse_map(data["test"], scale, timestep, draws) for scale in scales]
        maps = {}
        for sigma in run["sigmas"]:  # RADAR's anomaly_map_sigma (default 4)
            blur = SeparableGaussianBlur(sigma)
            normal = torch.cat([blur(held), blur(held_edges), *map(blur, held_coarse)], dim=1)
            scored = torch.cat([blur(test), blur(test_edges), *map(blur, test_coarse)], dim=1)
            for bands in run["border_bands"]:  # 1: one mean and spread per map; more: per distance from the border
                standardiser = BorderStandardiser(2 + len(scales), bands)
                standardiser.fit(band_moments(normal, bands))
                noise, sobel, *coarse = standardiser(scored).split(1, dim=1)
                suffix = ("" if bands == 1 else f"_bands{bands}") + ("" if sigma == 4.0 else f"_sigma{sigma:g}")
                maps |= {
                    f"noise{suffix}": noise,
                    f"sobel{suffix}": sobel,
                    f"combined{suffix}": torch.maximum(noise, sobel),
                }
                for scale_set in run["coarse_scales"]:  # the combined map joined by those coarse maps (RADAR's)
                    joined = maps[f"combined{suffix}"]
                    for scale in scale_set:
                        joined = torch.maximum(joined, coarse[scales.index(scale)])
                    maps[f"combined{suffix}_coarse{'-'.join(map(str, scale_set))}"] = joined
        scores: dict[str, float] = {}
        for name, amap in maps.items():
            flat = amap.flatten(1)
            scores[f"pixel_{name}"] = round(roc_auc_score(masks.ravel(), amap.numpy()[:, 0].ravel()), 3)
            for share in TOP_SHARES:  # RADAR's top_k_fraction (default 0.01) and its neighbours
                top = flat.topk(max(1, int(share * flat.shape[1])), dim=1).values.mean(dim=1)
                scores[f"image_top{share * 100:g}%_{name}"] = round(roc_auc_score(labels, top.numpy()), 3)
                normal_top = top[~defective]
                # a margin that AUROC 1.000 hides: the share of defective images above every normal one
                above = (top[defective] > normal_top.max()).float().mean()
                scores[f"tpr0_top{share * 100:g}%_{name}"] = round(float(above), 3)
                # and one that keeps moving past it: the lowest defective score above the highest normal one, in
                # standard deviations of the normal scores (negative: the two overlap)
                gap = (top[defective].min() - normal_top.max()) / normal_top.std()
                scores[f"margin_top{share * 100:g}%_{name}"] = round(float(gap), 2)
                # the defect type that sets it
                scores[f"weakest_top{share * 100:g}%_{name}"] = str(types[defective.numpy()][top[defective].argmin()])
        features = {"held": edge_features(held_edges, 32), "test": edge_features(test_edges, 32)}
        forest = TensorIsolationForest(n_estimators=100)
        forest.fit(features["held"])
        scores["image_forest_held_out"] = round(roc_auc_score(labels, forest(features["test"]).numpy()), 3)
        if args.forest_on_training_images:
            forest.fit(edge_features(sobel_edge_map(noise_map(data["fit"], timestep, draws, mode)), 32))
            scores["image_forest_training"] = round(roc_auc_score(labels, forest(features["test"]).numpy()), 3)
        result[f"{prefix}t{timestep}_draws{draws}_{mode}"] = scores
    return result


def untrained_padim() -> "PadimLite0":
    """anomalib's PaDiM on Lite0 with untrained statistics of the right shapes: the cost is the same as trained."""
    from anomalib_diffusion.models import PadimLite0

    padim = PadimLite0()
    padim.model.gaussian.mean = torch.zeros(100, 4096)
    padim.model.gaussian.inv_covariance = torch.eye(100).expand(4096, 100, 100).contiguous()
    return padim


def latency(args: argparse.Namespace) -> None:
    from anomalib_diffusion.models.radar import RADARModel

    class Outputs(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            output = self.model(image)
            return output.pred_score, output.anomaly_map

    core = ov.Core()
    image = torch.rand(1, 3, 256, 256)

    def compiled(model: torch.nn.Module) -> ov.CompiledModel:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            torch.onnx.export(Outputs(model.eval()), (image,), path, dynamo=True, optimize=False, opset_version=18)
            return core.compile_model(ov.convert_model(path), "CPU", compile_config("f32", PERFORMANCE_HINT="LATENCY"))

    models = {}
    for widths in args.widths:
        config = UNetConfig(sample_size=64, block_out_channels=widths, attention_resolutions=(), mid_attention=False)
        for scales in args.coarse_scales:
            network = RADARModel(unet=config, coarse_scales=scales)
            network.fitted.fill_(True)
            name = ",".join(map(str, widths))
            models[name if len(args.coarse_scales) == 1 else f"{name} coarse {list(scales)}"] = compiled(network)
    models["PadimLite0"] = compiled(untrained_padim().model)
    requests = {name: model.create_infer_request() for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in requests}
    array = image.numpy()
    for request in requests.values():
        for _ in range(3):
            request.infer([array])
    for _ in range(25):  # interleaved, so that a slow moment of the machine hits every model alike
        for name, request in requests.items():
            start = time.perf_counter()
            request.infer([array])
            times[name].append(1000 * (time.perf_counter() - start))
    reference = min(times["PadimLite0"])
    for name, values in times.items():
        ms = {"min_ms": round(min(values), 1), "median_ms": round(float(np.median(values)), 1)}
        report({"widths": name, **ms, "x_padim_min": round(min(values) / reference, 2)}, args.log)


def profile(args: argparse.Namespace) -> None:
    """Where the exported RADAR's time goes: OpenVINO's per-node counters of 20 runs, summed by node type.

    (The node names of a dynamo-exported graph do not carry the U-Net's module paths, so no finer grouping.)
    """
    from anomalib_diffusion.models import RADAR

    core = ov.Core()
    array = torch.rand(1, 3, 256, 256).numpy()
    radar = RADAR(**json.loads(args.settings))
    radar.model.fitted.fill_(True)  # untrained weights and statistics: the cost is the same
    padim = untrained_padim()
    config = compile_config("f32", PERFORMANCE_HINT="LATENCY")
    with tempfile.TemporaryDirectory() as folder:
        compiled = {}
        for name, model in (("RADAR", radar), ("PadimLite0", padim)):
            path = model.eval().to_openvino(Path(folder) / name, input_size=(256, 256))
            compiled[name] = core.compile_model(path, "CPU", {**config, "PERF_COUNT": "YES"})
    for name, model in compiled.items():
        request = model.create_infer_request()
        for _ in range(3):
            request.infer([array])
        totals: dict[str, float] = {}
        wall = []
        for _ in range(args.runs):
            start = time.perf_counter()
            request.infer([array])
            wall.append(1000 * (time.perf_counter() - start))
            for node in request.profiling_info:
                if node.status == ov.ProfilingInfo.Status.EXECUTED:
                    totals[node.node_type] = (
                        totals.get(node.node_type, 0.0) + node.real_time.total_seconds() * 1000 / args.runs
                    )
        top = dict(sorted(((key, round(ms, 2)) for key, ms in totals.items()), key=lambda item: -item[1])[:25])
        report(
            {
                "model": name,
                "median_ms": round(float(np.median(wall)), 1),
                "nodes_ms": round(sum(totals.values()), 1),
                "groups_ms": top,
            },
            args.log,
        )


def report(result: dict, log: Path | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if log is not None:
        with log.open("a") as handle:
            handle.write(line + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, default=None, help="append every JSON line to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    scoring = commands.add_parser("quality", help="train one U-Net, score its inference variants")
    scoring.add_argument("--root", type=Path, required=True, help="MVTec AD-layout root (e.g. the devbench)")
    scoring.add_argument("--category", required=True)
    scoring.add_argument("--run", default="{}", help=f"JSON overrides of {DEFAULT_RUN}")
    scoring.add_argument("--forest-on-training-images", action="store_true", help="also fit the forest there")
    timing = commands.add_parser("latency", help="OpenVINO FP32 latency of RADAR widths against PaDiM")
    timing.add_argument("--widths", nargs="+", type=lambda text: tuple(int(w) for w in text.split(",")), required=True)
    timing.add_argument(
        "--coarse-scales",
        nargs="+",
        type=lambda text: () if text == "none" else tuple(int(s) for s in text.split(",")),
        default=[()],
        help="RADAR coarse_scales sets to time, e.g. none 4 2,4 (default: none, RADAR's)",
    )
    profiling = commands.add_parser("profile", help="OpenVINO FP32 time per node type of the exported RADAR and PaDiM")
    profiling.add_argument("--settings", default="{}", help="JSON keyword arguments of RADAR (default: its defaults)")
    profiling.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"quality": quality, "latency": latency, "profile": profile}[args.command](args)


if __name__ == "__main__":
    main()
