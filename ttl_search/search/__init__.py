"""What to train next: study configs, the search methods (samplers whose whole state is the stored
trials), the typed trial record and the schedulers a study may name."""
