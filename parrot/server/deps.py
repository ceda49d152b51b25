"""FastAPI dependencies shared by the routers: the service and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from . import models as m
from .service import ParrotService
from .tenancy import Tenant

ERRORS = {status: {"model": m.ErrorBody} for status in (400, 401, 404, 409, 413, 422, 429)}


def _api_key(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


def service_of(request: Request) -> ParrotService:
    return request.app.state.service


def tenant_of(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> Tenant:
    """The tenant whose API key came with the request (401 otherwise)."""
    return service_of(request).authenticate(_api_key(authorization, x_api_key))


def admin_of(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    service_of(request).check_admin(_api_key(authorization, x_api_key))


TenantDep = Annotated[Tenant, Depends(tenant_of)]
ServiceDep = Annotated[ParrotService, Depends(service_of)]
