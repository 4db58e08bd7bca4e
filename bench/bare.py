"""The ceiling: a bare FastAPI app with no database, served with the same uvicorn settings."""

from fastapi import FastAPI, Request

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/bare")
async def bare_get() -> dict[str, object]:
    return {"resourceType": "Patient", "id": "bare", "active": True}


@app.post("/bare")
async def bare_post(request: Request) -> dict[str, object]:
    body = await request.body()
    return {"resourceType": "Patient", "id": "bare", "received": len(body)}
