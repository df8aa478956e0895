"""The `export` command: ONNX, TorchScript and OpenVINO IR files of kapao weights (:mod:`kapao.export`),
added to the `kapao` group by :mod:`kapao.cli.main`."""
from __future__ import annotations

import click

from kapao.cli.options import ImgShape, calibration, check_device, check_half, int8_options, must_exist
from kapao.runtime import setup_logging


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
def export(ctx: click.Context, weights: str, fmt: str, imgsz: tuple[int, int], dynamic: bool, half: bool, simplify: bool,
           opset: int, batch: int, device: str | None, output: str | None, exist_ok: bool, check_image: str | None,
           no_check: bool, int8: bool, data: str | None, calib: str | None, calib_images: int) -> None:
    """Export weights to ONNX: images (B, 3, H, W) RGB 0-1 -> decoded (B, N, 6 + 3K); the schema travels in the file."""
    setup_logging(ctx.obj.get("verbose", False))
    if int8 and half:  # contradicting options: a usage error, before the CUDA check
        raise click.UsageError("--int8 and --half exclude each other: int8 runs on the CPU (onnxruntime); drop one")
    check_half(ctx, half, device)
    from kapao.backends.runtimes import read_metadata
    from kapao.export import describe_check, export_onnx

    if fmt != "onnx":
        _export_other(ctx, fmt, weights, imgsz, dynamic, half, simplify, int8, batch, device, output, exist_ok,
                      check_image, no_check)
        return
    int8_calib = calibration(int8, calib, calib_images, max(imgsz), data)
    path = export_onnx(weights, output, imgsz, dynamic=dynamic, half=half, simplify=simplify, opset=opset,
                       batch=batch, check_image=check_image, check=not no_check, device=device, exist_ok=exist_ok,
                       int8=int8_calib)
    info = read_metadata(path)
    shape = "dynamic batch/height/width" if info.dynamic else f"input {info.batch}x3x{info.imgsz[0]}x{info.imgsz[1]}"
    precision = "int8" if int8 else "fp16" if info.half else "fp32"
    click.echo(f"Exported {path} ({path.stat().st_size / 1e6:.1f} MB; {shape}; {precision}; opset {opset})")
    click.echo(describe_check(info.raw))
    click.echo(f"Run it: kapao predict SOURCE --weights {path}")


def _export_other(ctx: click.Context, fmt: str, weights: str, imgsz: tuple[int, int], dynamic: bool, half: bool,
                  simplify: bool, int8: bool, batch: int, device: str | None, output: str | None, exist_ok: bool,
                  check_image: str | None, no_check: bool) -> None:
    """export --format torchscript|openvino: the options ONNX alone has are usage errors."""
    from kapao.backends.dispatch import load_backend
    from kapao.export import describe_check, export_openvino, export_torchscript

    wrong = [o for o, on in (("--simplify", simplify), ("--int8", int8), ("--dynamic", dynamic and fmt == "torchscript"),
                             ("--half", half and fmt == "openvino")) if on]
    if wrong:
        raise click.UsageError(f"{wrong[0]} is not available with --format {fmt}")
    check = not no_check
    if fmt == "torchscript":
        path = export_torchscript(weights, output, imgsz, batch=batch, half=half, device=device, check_image=check_image,
                                  check=check, exist_ok=exist_ok)
    else:
        path = export_openvino(weights, output, imgsz, dynamic=dynamic, batch=batch, check_image=check_image,
                               check=check, exist_ok=exist_ok)
    info = load_backend(str(path)).info
    click.echo(f"Exported {path} ({fmt}; {info.precision}; {'dynamic' if dynamic else f'input {batch}x3x{imgsz[0]}x{imgsz[1]}'})")
    click.echo(describe_check(info.details))
    click.echo(f"Run it: kapao predict SOURCE --weights {path}")
