"""The trainer's support code, one module per concern; train_breakout.py holds the DQN and imports from here,
never the other way round.

    cli         one-line errors and exit statuses, flags made from a dataclass, the start-up table
    files       files written whole or not at all, writes that survive a full disk
    checkpoint  compressed arrays, a declared state walked by save and load, full checkpoints
    run_folder  one trainer per folder (its lock), which checkpoint a resume reads
    background  stop signals, and the helper process evaluations play in beside training
    device      the device and its memory, uploads that do not wait, what "auto" means here, torch's threads
    compiling   torch.compile of the loss and acting: warm-up, one check against eager, falling back
    logs        metrics.csv, TensorBoard, progress, the learning figures a row reads
    schedule    periodic work, due at the multiples of an interval
    curve       the run's history and curve.png
    video       evaluation and play videos
    atari       the emulator: ale-py's vector games, and one gym.make game that saves exactly
"""
