"""Career: distress about work, jobs and calling."""

from dharma_kernel.families import CrisisModule


class Career(CrisisModule):
    name = "career"
    module_api = "1.0"
    concepts = (
        "व्यवसाय", "जीविका", "नौकरी",
        "vyavasāya", "jīvikā", "naukarī",
        "career", "job", "unemployment", "laid off", "promotion", "burnout",
    )  # fmt: skip
