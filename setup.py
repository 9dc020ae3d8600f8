"""daa_jax: Direct Alignment Algorithms and their over-optimization, in JAX."""
import setuptools

setuptools.setup(
    name="daa_jax",
    version="0.1.0",
    description=("DPO/IPO/SLiC on Pythia, Llama, Qwen2, Mistral and Gemma-2 decoders in "
                 "JAX/Flax, with KL measurement and scaling-law fits of reward "
                 "over-optimization."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["daa_jax", "daa_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "jinja2>=3.1",  # chat templates (config.data.chat_template)
        "safetensors>=0.4",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "chex>=0.1.86",
        "pyarrow>=14",
        "tensorboard>=2.15",  # event files only (no TensorFlow)
    ],
    extras_require={
        # torch (CPU) is for parity tests against transformers only; install torch==2.13.0
        # (CPU build) first, as the README says, or pip pulls a multi-GB CUDA build.
        "test": ["pytest>=7", "pytest-xdist>=3", "torch", "peft>=0.13"],
        # jax[tpu] pins the libtpu of the installed jax version (it also lets
        # `python -m daa_jax.plan --platform tpu` compile for TPU topologies on any machine);
        # gcsfs: gs:// workdirs through etils.epath.
        "tpu": ["jax[tpu]>=0.6", "gcsfs"],
        "cuda": ["jax[cuda12]"],
        "bench": ["torch", "trl", "datasets"],
        # format='tfds': the TL;DR comparisons as array_record, read without TensorFlow.
        "tfds": ["tensorflow-datasets>=4.9", "array_record>=0.5"],
        # format='hf': preference data from the `datasets` library (save_to_disk, hub ids).
        "hf": ["datasets>=2.14"],
        # config.log.wandb=PROJECT: metrics also to Weights & Biases (imported only when set).
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["daa-jax=daa_jax.main:cli"]},
)
