"""Sidebar widgets: which model, which TTA mode, which files. Each function draws widgets and returns values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from app.escape import markdown_text
from app.predictors import TTA_LABELS, TTA_MODES, ModelInfo, list_bundles, load_bundle_cached, remote_versions
from app.settings import AppSettings
from app.uploads import MASK_TYPES, SCAN_TYPES, UploadedBytes, UploadError, collect_upload
from medseg.bundle import Bundle
from medseg.errors import MedsegError
from medseg.inference.compatibility import bundle_quality


@dataclass(frozen=True)
class ModelChoice:
    bundle_path: Path | None  # None: the remote service
    bundle: Bundle | None
    tta: str
    inference_url: str | None = None  # the service's URL, or a fine-tuned version's (``/versions/<name>``) on it
    remote_name: str = ""  # the chosen version's name on the service ("" when it lists none)
    remote_version: str = ""


def no_model_message(models_dir: Path) -> str:
    return (
        f"**No model found in `{models_dir}`.** The app needs a model bundle to segment scans.\n\n"
        "* Try the demo: run `make demo` in the medseg folder; it trains a small nuclei model and copies it to "
        "`models/demo-nuclei`.\n"
        "* Or train on your data: `medseg train configs/experiments/<experiment>.yaml --data <dataset> --out "
        "outputs/<name>`, then copy `outputs/<name>/bundle` to `models/<name>`.\n"
        "* Or start the app on another folder: `medseg app --models <folder>`, then reload this page."
    )


def choose_model(settings: AppSettings) -> ModelChoice | None:
    """Model picker; None (with the reason shown) when there is nothing to choose."""
    if settings.inference_url:
        st.caption("The model runs on the inference service configured by the administrator.")
        url, name, version = _choose_remote_version(settings.inference_url)
        return ModelChoice(None, None, _choose_tta(), url, name, version)
    bundles = list_bundles(settings.models_dir)
    if not bundles:
        return None
    path = st.selectbox(
        "Model bundle", bundles, format_func=_model_label, key="model_path",
        label_visibility="collapsed",  # under the sidebar's "Model" heading
    )
    try:
        bundle = load_bundle_cached(path)
    except MedsegError as e:
        st.error(f"This model cannot be loaded: {markdown_text(e)}")
        return None
    versions = model_versions(bundles, bundle)
    if len(versions) > 1:
        st.caption("Versions of this model:  \n" + "  \n".join(markdown_text(v) for v in versions))
    quality = bundle_quality(bundle)
    if quality:  # next to the name, not only inside the collapsed model card
        st.warning(f"{markdown_text(quality)}: its masks may be poor.", icon=":material/warning:")
    return ModelChoice(path, bundle, _choose_tta())


def _choose_remote_version(base_url: str) -> tuple[str, str, str]:
    """(URL, name, version) of the service's model version to segment with: a picker once the service has
    fine-tuned versions (the served bundle stays the default; a new version is chosen on purpose)."""
    try:
        versions = remote_versions(base_url)
    except Exception:  # noqa: BLE001 - service down: loading the model says so on the page
        return base_url, "", ""
    if len(versions) <= 1:
        return base_url, str(versions[0]["name"]) if versions else "", ""
    by_name = {str(v["name"]): v for v in versions}

    def label(name: str) -> str:
        v = by_name[name]
        dice = (f" · held-aside Dice {v['dice_before']:.3f} → {v['dice_after']:.3f}"
                if v.get("dice_after") is not None and v.get("dice_before") is not None else "")
        return f"{name} · v{v['version']}{dice}"

    name = st.selectbox("Model version", list(by_name), format_func=label, key="remote_version",
                        help="Versions fine-tuned on the inference service from reviewed cases.")
    chosen = by_name[name]
    return base_url.rstrip("/") + str(chosen["base_path"]), name, str(chosen["version"])


def _model_label(path: Path) -> str:
    """``name``, ``name · v2``, ``name · barely trained`` (a bundle that cannot load is named as is; choosing it
    says why)."""
    name = path.name.removesuffix(".zip")
    try:
        bundle = load_bundle_cached(path)
    except MedsegError:
        return name
    version = bundle.preprocessing.get("version")
    label = name if not version or f"v{version}" in name else f"{name} · v{version}"
    return f"{label} · barely trained" if bundle_quality(bundle) else label


def model_versions(bundles: list[Path], chosen: Bundle) -> list[str]:
    """One line per version of the chosen model (same model name) in the models folder, oldest first."""
    lines = []
    for path in bundles:
        try:
            bundle = load_bundle_cached(path)
        except MedsegError:
            continue
        if bundle.name != chosen.name:
            continue
        lineage = bundle.preprocessing.get("lineage") or {}
        dice = (f", held-aside Dice {lineage['dice_before']:.3f} → {lineage['dice_after']:.3f}"
                if "dice_after" in lineage else "")
        this = " (chosen)" if bundle.path == chosen.path else ""
        lines.append((int(bundle.preprocessing.get("version") or 1),
                      f"v{bundle.preprocessing.get('version') or 1}: {path.name}, weights {bundle.weights_hash[:8]}"
                      f"{dice}{this}"))
    return [text for _, text in sorted(lines)]


def _choose_tta() -> str:
    return st.selectbox(
        "Test-time augmentation", TTA_MODES, format_func=TTA_LABELS.get, key="tta",
        help="Averages predictions over flipped / shifted copies of the scan: smoother masks and uncertainty, "
        "at 2-8x the run time.",
    )


def _demote_headings(markdown: str, levels: int = 3) -> str:
    """Model cards start at ``#``; in the sidebar their headings should not outshout the page's."""
    return re.sub(r"^(#{1,6}) ", lambda m: "#" * min(6, len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def model_details(info: ModelInfo) -> None:
    """Identity of the model that segments (name, version, weights hash, device) and its model card."""
    # Everything here comes from the bundle or the service: shown as text (the model card is Markdown by design;
    # Streamlit renders no HTML in it).
    if info.description:
        st.caption(markdown_text(info.description))
    st.caption(
        f"Version: {markdown_text(info.version) if info.version else 'not recorded in the bundle'}  \n"
        f"Weights: {markdown_text(info.weights_hash or 'unknown')}  \n"
        f"Runs on: **{markdown_text(info.device)}**" + (" (inference service)" if info.remote else "")
    )
    if info.model_card:
        with st.expander("Model card"):
            st.markdown(_demote_headings(info.model_card))


def choose_files(settings: AppSettings) -> tuple[UploadedBytes | None, tuple[str, bytes] | None]:
    """The scan upload (files, a zip, or a DICOM folder) and the optional ground truth."""
    st.subheader("Scan")
    files_tab, folder_tab = st.tabs(["Files", "DICOM folder"])
    with files_tab:
        files = st.file_uploader(
            "Image, volume, DICOM files or .zip", type=list(SCAN_TYPES), accept_multiple_files=True, key="scan_files",
            max_upload_size=settings.upload_mb,
            help="One image (PNG, JPG, TIFF), one volume (NIfTI, NRRD, MHA), the files of one DICOM series, "
            "or a .zip of a DICOM folder.",
        )
    with folder_tab:
        folder = st.file_uploader(
            "DICOM folder", accept_multiple_files="directory", key="scan_folder",
            max_upload_size=settings.upload_mb,
            help="Choose the folder of a DICOM series (sub-folders are included).",
        )
    chosen = files or folder or []
    truth_file = st.file_uploader(
        "Ground truth mask (optional)", type=list(MASK_TYPES), key="truth_file",
        max_upload_size=settings.upload_mb,
        help="A label image on the same grid as the scan, to compare with the model (Dice, HD95).",
    )
    st.caption(settings.limits_text())
    truth = (truth_file.name, truth_file.getvalue()) if truth_file is not None else None
    try:
        return _remembered_upload(chosen, settings), truth
    except UploadError as e:
        st.error(markdown_text(e), icon=":material/error:")
        return None, truth


def _remembered_upload(chosen: list, settings: AppSettings) -> UploadedBytes | None:
    """Hash the upload once, not on every rerun (hundreds of MB of DICOM take a second to hash)."""
    if not chosen:
        return None
    ids = tuple(f.file_id for f in chosen)
    remembered = st.session_state.get("_upload_bytes")
    if remembered is not None and remembered[0] == ids:
        return remembered[1]
    upload = collect_upload(chosen, settings)
    st.session_state["_upload_bytes"] = (ids, upload)
    return upload
