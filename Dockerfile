FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir .
ENV ZOO_DATA_DIR=/data
EXPOSE 8000
CMD ["zoo", "serve", "--host", "0.0.0.0", "--port", "8000"]
