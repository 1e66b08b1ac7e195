"""Image I/O, modality preprocessing, datasets, manifests, patient-level splits and synthetic cohorts."""
