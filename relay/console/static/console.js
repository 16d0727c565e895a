// The console's charts: each page puts its numbers in <script type="application/json" id="chart-data"> (no
// inline script runs: the Content-Security-Policy forbids it) and a <canvas> per chart; this draws them.
"use strict";
(function () {
  const source = document.getElementById("chart-data");
  if (!source || !window.Chart) {
    return;
  }
  const data = JSON.parse(source.textContent);
  const colour = {
    sent: "#64748b", delivered: "#16a34a", bounced: "#dc2626", complained: "#9333ea",
    human: "#2563eb", machine: "#f59e0b", other: "#cbd5e1",
  };
  Chart.defaults.animation = false;
  Chart.defaults.font.family = "system-ui, -apple-system, 'Segoe UI', sans-serif"; // the system's: no remote font
  Chart.defaults.maintainAspectRatio = false;

  // Draw a chart and note on its canvas how many points it holds and their sum (what a test can read).
  function draw(id, config) {
    const canvas = document.getElementById(id);
    if (!canvas) {
      return;
    }
    new Chart(canvas, config);
    let total = 0;
    let points = 0;
    for (const set of config.data.datasets) {
      for (const value of set.data) {
        total += value;
        points += 1;
      }
    }
    canvas.dataset.total = String(total);
    canvas.dataset.points = String(points);
  }

  function bars(label, values, key) {
    return { label: label, data: values, backgroundColor: colour[key] };
  }

  function stacked(labels, datasets) {
    return {
      type: "bar",
      data: { labels: labels, datasets: datasets },
      options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } },
    };
  }

  if (data.series) {
    const s = data.series;
    const labels = data.labels.map(function (b) {
      return data.by === "hour" ? b.slice(5).replace("T", " ") + "h" : b.slice(5);
    });
    draw("chart-volume", {
      type: "bar",
      data: {
        labels: labels,
        datasets: [bars("sent", s.sent, "sent"), bars("delivered", s.delivered, "delivered"),
          bars("bounced", s.bounced, "bounced"), bars("complaints", s.complained, "complained")],
      },
      options: { scales: { y: { beginAtZero: true } } },
    });
    draw("chart-opens", stacked(labels, [bars("human", s.human_opens, "human"),
      bars("machine", s.machine_opens, "machine"), bars("no verdict", s.other_opens, "other")]));
    draw("chart-clicks", stacked(labels, [bars("human", s.human_clicks, "human"),
      bars("machine", s.machine_clicks, "machine"), bars("no verdict", s.other_clicks, "other")]));
  }
  if (data.funnel) {
    draw("chart-funnel", {
      type: "bar",
      data: {
        labels: data.funnel.labels,
        datasets: [{ label: "copies", data: data.funnel.values, backgroundColor: [colour.sent, colour.delivered,
          colour.other, colour.human, colour.other, colour.human] }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true } } },
    });
  }
})();
