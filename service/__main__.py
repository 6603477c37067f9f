"""`python -m service`: one uvicorn worker serving the app with settings from the environment."""

import uvicorn

from service.app import create_app
from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
