from pathlib import Path

import dagster as dg


class AsxFilesResource(dg.ConfigurableResource):
    """Where the ASX vendor delivers its files (trades/, quotes/, reference-data/)."""

    data_dir: str

    def path(self) -> Path:
        path = Path(self.data_dir)
        if not (path / "reference-data" / "company_info.csv").is_file():
            raise FileNotFoundError(
                f"{path} is not an ASX vendor directory: reference-data/company_info.csv is missing (set K2_ASX_DATA_DIR)"
            )
        return path


defs = dg.Definitions(resources={"asx_files": AsxFilesResource(data_dir=dg.EnvVar("K2_ASX_DATA_DIR"))})
