"""Training without Ray: one step and one epoch (`engine`), the in-process pretrain job (`pretrain`), its
input (`feed`, placed by `placement`), its checkpoints and stores (`checkpoint`), its watchers
(`callbacks`) and its run folder (`run_folder`). The Ray layer reuses all of them inside its workers."""
