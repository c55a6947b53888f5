"""Models: heads, the Classifier (backbone + head) and its safe save/load, the training engine
(``train_one_epoch``/``evaluate``) and the fine-tuning policy (what is frozen, which learning rates).
"""
