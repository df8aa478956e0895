"""The `export` and `info` commands: the model as a file (ONNX) and the model described, added to the
`kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

from typing import Any

import click

from kapao.cfg.dataset import resolve_schema
from kapao.cli.options import (
    MODEL_SIZES,
    ImgShape,
    ImgSize,
    bad_parameter,
    calibration,
    check_device,
    check_half,
    given,
    int8_options,
    must_exist,
)
from kapao.errors import ConfigError
from kapao.weights.registry import weights_help


@click.command()
@click.option("--weights", default=None, callback=must_exist("weights"),
              help=f"Describe a checkpoint (kapao or official file) or named weights: {weights_help()}.")
@click.option("--names", "list_names", is_flag=True, help="List the named weights (published AP, dataset, input size).")
@click.option("--size", type=click.Choice(MODEL_SIZES), default="s", show_default=True, help="Model size.")
@click.option("--kpts", type=click.IntRange(min=1), default=None,
              help="Number of keypoints (17: COCO names, 14: CrowdPose names, else kp0..kpK-1). [default: 17]")
@click.option("--data", default=None, callback=must_exist("data"),
              help="Take the keypoint schema from a dataset config: coco, crowdpose or a YAML.")
@click.option("--imgsz", type=ImgSize(), default=1280, show_default=True, help="Square input size for the GFLOPs figure.")
def info(weights: str | None, list_names: bool, size: str, kpts: int | None, data: str | None, imgsz: int) -> None:
    """Print a model summary: layers, parameters, GFLOPs and keypoint names (named weights: their entry
    too; the summary once the file is in the cache)."""
    ctx = click.get_current_context()
    if kpts is not None and data is not None:
        raise click.UsageError(f"--kpts {kpts} contradicts --data {data} (the dataset sets the keypoints); give one")
    if weights is not None and given(ctx, "size", "kpts", "data"):
        raise click.UsageError(f"{', '.join(given(ctx, 'size', 'kpts', 'data'))} describe a new model; --weights "
                               "already fixes size and keypoints: give either --weights or those")
    if list_names:
        from kapao.weights.describe import named_weights_table

        for line in named_weights_table():
            click.echo(line)
        return
    if weights is None:
        from kapao.models.network import build_model, format_model_info, model_info

        try:
            schema = resolve_schema(num_keypoints=kpts, data=data)
        except ConfigError as e:  # a --data YAML that is not a dataset config: a usage error, as for val/train
            raise bad_parameter(e, ctx, "data") from None
        click.echo(format_model_info(model_info(build_model(size, schema), imgsz)))
        return
    from kapao.weights.describe import describe_weights

    for line in describe_weights(weights, imgsz):
        click.echo(line)


@click.command()
@click.option("--weights", default="kapao_s_coco", show_default=True, callback=must_exist("weights"),
              help="Checkpoint or name to export.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "openvino"]), default="onnx", show_default=True,
              help="onnx (onnxruntime, TensorRT, most runtimes), torchscript (torch/C++), openvino (IR, Intel; "
                   "pip install 'kapao[openvino]').")
@click.option("--imgsz", type=ImgShape(), default="640", show_default=True,
              help="Input size: 640 or H,W (multiples of 64); fixed unless --dynamic.")
@click.option("--dynamic", is_flag=True, help="Free batch, height and width.")
@click.option("--half", is_flag=True, help="FP16 export (CUDA only).")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxslim.")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True, help="ONNX opset (SiLU needs 13+).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Fixed batch (ignored with --dynamic).")
@click.option("--device", default=None, callback=check_device, help="cpu, 0, … [default: cpu; first GPU with --half]")
@click.option("-o", "--output", default=None, help="Output file or folder. [default: <weights stem>.onnx next to the weights]")
@click.option("--exist-ok", is_flag=True, help="Overwrite an existing output file (else export refuses).")
@click.option("--check-image", default=None, help="Image for the onnxruntime-vs-torch check. [default: ultralytics bus.jpg]")
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime-vs-torch check.")
@int8_options(with_data=True)
@click.pass_context
def export(ctx: click.Context, **params: Any) -> None:
    """Export weights to ONNX (or TorchScript, OpenVINO IR): images (B, 3, H, W) RGB 0-1 -> decoded (B, N, 6 + 3K);
    the schema travels in the file."""
    p = params
    if p["int8"] and p["half"]:  # contradicting options: a usage error, before the CUDA check
        raise click.UsageError("--int8 and --half exclude each other: int8 runs on the CPU (onnxruntime); drop one")
    _check_format_options(p)
    int8_calib = calibration(p["int8"], p["calib"], p["calib_images"], max(p["imgsz"]), p["data"])  # before torch
    check_half(ctx, p["half"], p["device"], bf16=False)
    if p["fmt"] != "onnx":
        _export_other(p)
        return
    from kapao.backends.runtimes import read_metadata
    from kapao.export import describe_check, export_onnx

    path = export_onnx(p["weights"], p["output"], p["imgsz"], dynamic=p["dynamic"], half=p["half"],
                       simplify=p["simplify"], opset=p["opset"], batch=p["batch"], check_image=p["check_image"],
                       check=not p["no_check"], device=p["device"], exist_ok=p["exist_ok"], int8=int8_calib)
    info = read_metadata(path)
    shape = "dynamic batch/height/width" if info.dynamic else f"input {info.batch}x3x{info.imgsz[0]}x{info.imgsz[1]}"
    precision = "int8" if p["int8"] else "fp16" if info.half else "fp32"
    click.echo(f"Exported {path} ({path.stat().st_size / 1e6:.1f} MB; {shape}; {precision}; opset {p['opset']})")
    click.echo(describe_check(info.raw))
    click.echo(f"Run it: kapao predict SOURCE --weights {path}")


def _check_format_options(p: dict[str, Any]) -> None:
    """The options ONNX alone has are usage errors with another --format (checked before anything is read)."""
    fmt = p["fmt"]
    wrong = [o for o, on in (("--simplify", p["simplify"]), ("--int8", p["int8"]),
                             ("--dynamic", p["dynamic"] and fmt == "torchscript"), ("--half", p["half"] and fmt == "openvino"))
             if on and fmt != "onnx"]
    if wrong:
        raise click.UsageError(f"{wrong[0]} is not available with --format {fmt}")


def _export_other(p: dict[str, Any]) -> None:
    """export --format torchscript|openvino (its options checked by :func:`_check_format_options`)."""
    from kapao.backends.dispatch import load_backend
    from kapao.export import describe_check, export_openvino, export_torchscript

    fmt = p["fmt"]
    if fmt == "torchscript":
        path = export_torchscript(p["weights"], p["output"], p["imgsz"], batch=p["batch"], half=p["half"], device=p["device"],
                                  check_image=p["check_image"], check=not p["no_check"], exist_ok=p["exist_ok"])
    else:
        path = export_openvino(p["weights"], p["output"], p["imgsz"], dynamic=p["dynamic"], batch=p["batch"],
                               check_image=p["check_image"], check=not p["no_check"], exist_ok=p["exist_ok"])
    info = load_backend(str(path)).info
    h, w = p["imgsz"]
    shape = "dynamic" if p["dynamic"] else f"input {p['batch']}x3x{h}x{w}"
    click.echo(f"Exported {path} ({fmt}; {info.precision}; {shape})")
    click.echo(describe_check(info.details))
    click.echo(f"Run it: kapao predict SOURCE --weights {path}")
