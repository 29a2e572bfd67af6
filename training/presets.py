"""Named sets of defaults, by flag name: what `--preset` selects.

Every value here is a setting of training/config.py; a flag given on the command line
overrides its preset value.
"""

PRESETS = {
    # The embedded default: a few minutes on a 2-core machine, 8 logical CPU replicas
    # as a 2x4 torus, batch-norm statistics over neighbouring pairs.
    "cpu_demo": dict(
        model_dir="runs/cpu_demo", dataset="digits", image_size=32, num_classes=10,
        resnet_depth=18, train_batch_size=64, eval_batch_size=64, train_epochs=6.0,
        bn_group_size=2, base_learning_rate=0.4, warmup_epochs=0.5, lr_decay="cosine",
        weight_decay=5e-5, log_every_steps=5, checkpoint_every_steps=20,
        num_cpu_devices=8, torus_shape=(2, 4)),
    # The classic ImageNet recipe (batch 1024, 90 epochs) on TFRecords in --data_dir.
    "imagenet": dict(
        model_dir="runs/imagenet", dataset="imagenet", image_size=224,
        num_classes=1000, resnet_depth=50, train_batch_size=1024, eval_batch_size=1024,
        train_epochs=90.0, base_learning_rate=0.1, warmup_epochs=5.0,
        lr_decay="polynomial", weight_decay=1e-4, label_smoothing=0.1,
        steps_per_execution=100, log_every_steps=100, checkpoint_every_steps=1000,
        eval_every_steps=5000, bn_group_size=1, cache_dataset=False),
}

# The paper's pod runs (Ying et al., 2018) on ImageNet TFRecords in --data_dir with
# --tpu: 1024 TPU v3 chips = 2048 replicas. LARS with the reference trainers' peak rate
# and warm-up for each global batch, polynomial (power 2) decay, label smoothing 0.1,
# no decay on batch norm or biases, bfloat16. The batch-norm group is chosen so that
# each group sees 32 examples (our rule, not a figure from the paper): 2 replicas of
# 16 at 32k, 1 replica of 32 at 64k.
_PAPER_COMMON = dict(
    dataset="imagenet", image_size=224, num_classes=1000, resnet_depth=50,
    # The reference evaluates with batch 1024, which does not divide over 2048 replicas.
    eval_batch_size=4096, optimizer="lars", lr_decay="polynomial", momentum=0.9,
    weight_decay=1e-4, label_smoothing=0.1, precision="mixed_bfloat16",
    steps_per_execution=100, log_every_steps=100, checkpoint_every_steps=500,
    eval_every_steps=500, allreduce="torus")
PRESETS["paper_32k"] = dict(
    _PAPER_COMMON, model_dir="runs/paper_32k", train_batch_size=32768,
    # 3558 steps (about 91 epochs); peak 34.0 after 12 epochs of warm-up.
    train_steps=3558, train_epochs=None, base_learning_rate=34.0 * 256 / 32768,
    warmup_epochs=12.0, bn_group_size=2)
PRESETS["paper_64k"] = dict(
    _PAPER_COMMON, model_dir="runs/paper_64k", train_batch_size=65536,
    # 90 epochs; peak 41.0 after 16 epochs of warm-up.
    train_epochs=90.0, base_learning_rate=41.0 * 256 / 65536, warmup_epochs=16.0,
    bn_group_size=1)
