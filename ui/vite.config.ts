import { defineConfig } from "vitest/config";

export default defineConfig({
  // Relative asset URLs: the same build works at any path (the node's `/`, a Tauri window).
  base: "./",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    // One small app: no need for source maps in what ships.
    sourcemap: false,
  },
  server: {
    port: 5173,
    strictPort: true,
    // `npm run dev` in a browser: forward /api to a running node (APIARY_API, default the node's
    // default address). The node refuses a foreign Origin, so the proxy drops it (dev only).
    proxy: {
      "/api": {
        target: process.env.APIARY_API ?? "http://127.0.0.1:7787",
        ws: true,
        changeOrigin: true,
        configure: (proxy) => {
          proxy.on("proxyReq", (req) => req.removeHeader("origin"));
          proxy.on("proxyReqWs", (req) => req.removeHeader("origin"));
        },
      },
    },
  },
  test: {
    environment: "happy-dom",
    // src/live.test.ts (opt-in) runs the whole dashboard against a real node at this origin.
    environmentOptions: { happyDOM: { url: process.env.APIARY_LIVE_URL ?? "http://localhost:3000/" } },
    include: ["src/**/*.test.ts"],
  },
});
