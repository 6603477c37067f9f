"""The model bundle: its format (`format`, shared with the trainer), loading (`load`), memory maps
(`mmap`) and the optional naming files (`naming_files`).
"""
