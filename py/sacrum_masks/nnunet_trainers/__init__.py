"""nnU-Net v2 trainers shipped with sacrum-masks (the folder that env.sh puts in ``nnUNet_extTrainer``).

How nnU-Net 2.8.1 finds them (``nnunetv2/utilities/find_objects.py``): a trainer name is first looked
up in nnU-Net's own ``nnunetv2.training.nnUNetTrainer`` package; only when it is not there, each folder
of ``nnUNet_extTrainer`` (``os.pathsep``-separated) is put at the front of ``sys.path`` for the lookup
and every module in it is imported **as a top-level module** (``nnUNetTrainer_SacrumCPU``, not
``sacrum_masks.nnunet_trainers.nnUNetTrainer_SacrumCPU``); the modules are dropped from
``sys.modules`` again afterwards. Hence the modules here use absolute imports only, have names that
cannot shadow another top-level module, and this ``__init__`` is never run by nnU-Net.

Training (``nnUNetv2_train ... -tr nnUNetTrainer_SacrumCPU``) and prediction from a model trained
with one of these trainers (``nnUNetv2_predict``, or an installed model zip, which names its trainer)
both need ``nnUNet_extTrainer`` to point here.
"""
